"""Speed without new math: modules that compute what decoder/ computes, swapped in by the loader.

`use_kernels` picks them from what this torch build reports, never from an
assumption about the machine: oneDNN for float32 where torch has it (plain or
packed weights), torch's grouped matmul for the experts elsewhere, and int8
weights (int8.py) where asked for.
"""

from __future__ import annotations

import torch
from torch import nn

from ..decoder.layers import Linear
from ..decoder.moe import Router, RoutedExperts
from .experts import GroupedExperts, OneDNNExperts, PackedExperts, grouped_mm_available
from .int8 import quantize_block_
from .onednn import OneDNNLinear, OneDNNRouter, onednn_serves, pack_weight, packing_available

__all__ = ["use_kernels", "quantize_block_", "pack_weight", "packing_available"]


def use_kernels(module: nn.Module, dtype: torch.dtype, packed: bool = False) -> nn.Module:
    """The kernels for `dtype` swapped into a model, a block or one layer (on the meta device, before its weights
    are read); returns the module, or its replacement where `module` itself is swapped.

    packed: the routed experts become PackedExperts, one matrix per expert, for the loader to pack.
    """
    for owner in list(module.modules()):
        for name, child in list(owner.named_children()):
            setattr(owner, name, _kernel(child, dtype, packed))
    return _kernel(module, dtype, packed)


def _kernel(module: nn.Module, dtype: torch.dtype, packed: bool) -> nn.Module:
    onednn = onednn_serves(dtype)
    if type(module) is Linear and onednn:
        _reclass(module, OneDNNLinear)
    elif type(module) is Router and onednn:
        _reclass(module, OneDNNRouter)
    elif type(module) is RoutedExperts:
        if not module.plain:  # gpt-oss's biased, clamped experts: oneDNN per expert, or the reference loop
            if onednn:
                _reclass(module, OneDNNExperts)
            return module
        if onednn and packed:
            with torch.device("meta"):
                return PackedExperts(module.num_experts, module.down.shape[1], module.down.shape[2])
        if onednn:
            _reclass(module, OneDNNExperts)
        elif grouped_mm_available(dtype):
            _reclass(module, GroupedExperts)
    return module


def _reclass(module: nn.Module, kernel: type) -> None:
    # The kernel classes are subclasses that only override how a matmul is run: same parameters, same
    # state, so the module's class is changed in place rather than the module copied.
    module.__class__ = kernel
