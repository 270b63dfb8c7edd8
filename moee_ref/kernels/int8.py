"""Weight-only int8: symmetric, one scale per output channel, dequantized to the compute dtype on use.

Applied to the attention projections, the routed experts and the plain MLPs
(shared experts, dense layers). The router, the norms and the embeddings stay
in full precision: routing decisions are what the embedding is made of.
A model in int8 holds about a quarter of its float32 weight bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..decoder.layers import Attention, SwiGLU
from ..decoder.moe import RoutedExperts
from .onednn import linear


# Rows quantized at a time: the float32 working copies then stay a few MiB, not a float32 copy of a layer's
# stacked experts (loading/memory.py counts them).
QUANTIZE_ROWS = 1024


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales) with weight ~= values * scales[..., None], one scale per output row."""
    rows = weight.reshape(-1, weight.shape[-1])
    values = torch.empty(rows.shape, dtype=torch.int8)
    scale = torch.empty(len(rows), dtype=torch.float32)
    for start in range(0, len(rows), QUANTIZE_ROWS):
        w = rows[start : start + QUANTIZE_ROWS].to(torch.float32, copy=True)  # worked on in place
        s = w.abs().amax(dim=-1) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row stays exactly zero
        values[start : start + len(w)] = w.div_(s[:, None]).round_().clamp_(-127, 127)
        scale[start : start + len(w)] = s
    return values.reshape(weight.shape), scale.reshape(weight.shape[:-1])


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        values, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("values", values)
        self.register_buffer("scale", scale)
        self.bias = linear.bias  # biases are tiny: kept as they are

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.values.to(x.dtype) * self.scale[:, None].to(x.dtype)
        return linear(x, weight, self.bias)


class Int8RoutedExperts(RoutedExperts):
    """Stacked experts in int8; only the experts a batch uses are dequantized, one at a time."""

    def __init__(self, experts: RoutedExperts):
        nn.Module.__init__(self)
        gate_up_values, gate_up_scale = quantize_rows(experts.gate_up.detach())
        down_values, down_scale = quantize_rows(experts.down.detach())
        for name, tensor in (("gate_up_values", gate_up_values), ("gate_up_scale", gate_up_scale),
                             ("down_values", down_values), ("down_scale", down_scale)):
            self.register_buffer(name, tensor)

    @property
    def num_experts(self) -> int:
        return self.gate_up_values.shape[0]

    def expert_matrices(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """([2 * size, dim], [dim, size]) weights of one expert, dequantized to dtype."""
        gate_up = self.gate_up_values[expert].to(dtype) * self.gate_up_scale[expert, :, None].to(dtype)
        down = self.down_values[expert].to(dtype) * self.down_scale[expert, :, None].to(dtype)
        return gate_up, down

    def run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.expert_matrices(expert, x.dtype)
        gate, up = linear(x, gate_up).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, down)


def quantize_block_(block: nn.Module) -> None:
    """Replace, in place, the large matrices of one decoder block by int8 versions."""
    for module in list(block.modules()):
        if isinstance(module, Attention):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(module, name, Int8Linear(getattr(module, name)))
        elif isinstance(module, SwiGLU):
            for name in ("gate", "up", "down"):
                setattr(module, name, Int8Linear(getattr(module, name)))
    moe = getattr(block.mlp, "experts", None)
    if isinstance(moe, RoutedExperts) and not isinstance(moe, Int8RoutedExperts):
        block.mlp.experts = Int8RoutedExperts(moe)
