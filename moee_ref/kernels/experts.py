"""Faster ways to run the routed experts; the same arithmetic as decoder/moe.py's RoutedExperts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..decoder.moe import RoutedExperts
from .onednn import linear


class OneDNNExperts(RoutedExperts):
    """One expert at a time through oneDNN (float32 on the CPU): it keeps its speed with the few rows an
    expert gets, where MKL's grouped matmul does not."""

    def run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up_bias, down_bias = self.biases(expert)
        gate, up = linear(x, self.gate_up[expert], gate_up_bias).chunk(2, dim=-1)
        return linear(self.activate(gate, up), self.down[expert], down_bias)


class PackedExperts(OneDNNExperts):
    """Each expert's matrices packed once into oneDNN's blocked layout (kernels/onednn.py `pack_weight`).

    A packed matrix is opaque (no slicing, no stacking), so the experts are
    lists of matrices rather than stacked tensors. The loader packs them one
    at a time as it reads them: a float copy of a layer's stacked experts
    never exists beside the packed one.
    """

    def __init__(self, num_experts: int, dim: int, size: int):
        nn.Module.__init__(self)
        self.gate_up = nn.ParameterList(torch.empty(2 * size, dim) for _ in range(num_experts))
        self.down = nn.ParameterList(torch.empty(dim, size) for _ in range(num_experts))
        self.gate_up_bias = self.down_bias = self.clamped_swiglu = None  # only plain experts are packed


class GroupedExperts(RoutedExperts):
    """All active experts in one grouped matmul call each for gate/up and down (torch's F.grouped_mm).

    Less Python per expert; on the CPU it runs through MKL, so it is the choice
    where oneDNN does not serve the dtype (bf16, or torch without oneDNN). Plain experts only.
    """

    def mix(self, x, token_of, slot_weights, counts) -> torch.Tensor:
        ends = counts.cumsum(0).to(torch.int32)  # block e is rows [ends[e-1], ends[e])
        gate, up = F.grouped_mm(x[token_of], self.gate_up.transpose(1, 2), offs=ends).chunk(2, dim=-1)
        out = F.grouped_mm(F.silu(gate) * up, self.down.transpose(1, 2), offs=ends) * slot_weights
        return torch.zeros_like(x).index_add_(0, token_of, out)


def grouped_mm_available(dtype: torch.dtype) -> bool:
    return hasattr(F, "grouped_mm") and dtype in (torch.float32, torch.bfloat16)
