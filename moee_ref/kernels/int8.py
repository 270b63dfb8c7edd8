"""Weight-only int8: symmetric, one scale per output channel.

Applied to the attention projections, the routed experts and the plain MLPs
(shared experts, dense layers). The router, the norms and the embeddings stay
in full precision: routing decisions are what the embedding is made of.
A model in int8 holds about a quarter of its float32 weight bytes.

The matmul (`int8_linear`) reads the int8 bytes themselves where it can:
for few rows on the CPU (an expert's handful of tokens at batch 1), torch's
weight-only int8 kernel streams a quarter of float32's bytes. It takes bf16
rows and widens them in registers, so it needs no bf16 dot products: float32
rows are rounded to bf16 for it, on a CPU without bf16 units too (there it
ran 0.44x to 0.62x oneDNN-packed float32's time for 1 to 4 rows, and
converting the weight 0.85x to 1.6x; bench/README.md). Its time grows with
every row, though, so above INT8_KERNEL_ROWS the weight is converted to the
compute dtype and the matmul runs there, the scales applied to its output
(one pass fewer than dequantizing the weight).
"""

from __future__ import annotations

import torch
from torch import nn

from ..decoder.layers import Attention, LatentAttention, SwiGLU
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


_INT8_MM = getattr(torch, "_weight_int8pack_mm", None)


def int8_linear(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (values * scale[:, None]).T + bias for int8 values [out, in] and float32 scales [out]."""
    rows = x.reshape(-1, x.shape[-1])
    if x.device.type == "cpu" and 0 < len(rows) <= int8_kernel_rows(x.dtype):
        # float32 rows are rounded to bf16 on the way in, and the bf16 result widened back
        out = _INT8_MM(rows.to(torch.bfloat16), values, scale.to(torch.bfloat16)).to(x.dtype).reshape(*x.shape[:-1], -1)
    else:
        out = linear(x, values.to(x.dtype)) * scale.to(x.dtype)
    return out if bias is None else out + bias


# Up to this many rows of each compute dtype torch's int8 kernel beats converting the weight, timed with 2
# threads (bench/README.md). bf16 rows, against a bf16 matmul on a CPU with AMX: the crossover fell between 8 and
# 16 rows from run to run. float32 rows, on a CPU with AVX2 only: about level with converting at 16 rows on one
# matrix, and in the model (OLMoE's dimensions, batch 1) 16 rows ran 0.82x float32's time where 8 ran 0.98x,
# converting a weight to float32 writing four bytes a weight. Fixed numbers, not timings made at start-up: which
# path a row takes changes its rounding, and the same text must get the same vector in every process.
# float16 and float64 rows always convert the weight.
INT8_KERNEL_ROWS = {torch.bfloat16: 8, torch.float32: 16}


def int8_kernel_rows(dtype: torch.dtype) -> int:
    """The most rows of `dtype` sent to torch's weight-only int8 kernel (0 where this torch has none)."""
    return INT8_KERNEL_ROWS.get(dtype, 0) if _INT8_MM is not None else 0


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        values, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("values", values)
        self.register_buffer("scale", scale)
        self.bias = linear.bias  # biases are tiny: kept as they are

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.values, self.scale, self.bias)


class Int8RoutedExperts(RoutedExperts):
    """Stacked experts in int8, each expert's matrices run through int8_linear on its own tokens."""

    def __init__(self, experts: RoutedExperts):
        nn.Module.__init__(self)
        gate_up_values, gate_up_scale = quantize_rows(experts.gate_up.detach())
        down_values, down_scale = quantize_rows(experts.down.detach())
        for name, tensor in (("gate_up_values", gate_up_values), ("gate_up_scale", gate_up_scale),
                             ("down_values", down_values), ("down_scale", down_scale)):
            self.register_buffer(name, tensor)
        # Biases and the activation (gpt-oss) are kept as they are; only the matrices are quantized.
        self.gate_up_bias, self.down_bias, self.clamped_swiglu = experts.gate_up_bias, experts.down_bias, experts.clamped_swiglu

    @property
    def num_experts(self) -> int:
        return self.gate_up_values.shape[0]

    def run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up_bias, down_bias = self.biases(expert)
        gate, up = int8_linear(x, self.gate_up_values[expert], self.gate_up_scale[expert], gate_up_bias).chunk(2, dim=-1)
        return int8_linear(self.activate(gate, up), self.down_values[expert], self.down_scale[expert], down_bias)


def quantize_block_(block: nn.Module) -> None:
    """Replace, in place, the large matrices of one decoder block by int8 versions."""
    for module in list(block.modules()):
        if isinstance(module, (Attention, LatentAttention)):
            for name in module.projections:
                if getattr(module, name) is not None:  # MLA has q_proj or the q_a/q_b pair
                    setattr(module, name, Int8Linear(getattr(module, name)))
        elif isinstance(module, SwiGLU):
            for name in ("gate", "up", "down"):
                setattr(module, name, Int8Linear(getattr(module, name)))
    moe = getattr(block.mlp, "experts", None)
    if isinstance(moe, RoutedExperts) and not isinstance(moe, Int8RoutedExperts):
        block.mlp.experts = Int8RoutedExperts(moe)
