"""Weight-only int8: symmetric, one scale per output channel.

Applied to the attention projections, the routed experts and the plain MLPs
(shared experts, dense layers). The router, the norms and the embeddings stay
in full precision: routing decisions are what the embedding is made of.
A model in int8 holds about a quarter of its float32 weight bytes.

The matmul (`int8_linear`) reads the int8 bytes themselves where it can:
for few rows on the CPU (an expert's handful of tokens at batch 1), torch's
weight-only int8 kernel streams a quarter of float32's bytes. It takes bf16
rows and widens them in registers, so it needs no bf16 dot products: float32
rows are rounded to bf16 for it, on a CPU without bf16 units too (where it
also beats converting the weight for few rows; bench/README.md). Its time grows with
every row, though, so above INT8_KERNEL_ROWS the weight is converted to the
compute dtype and the matmul runs there, the scales applied to its output
(one pass fewer than dequantizing the weight).

For float32 compute the matmuls are integer dot products where the CPU has them (`integer_path`, chosen once
per process by fixed rules, since which path runs changes the rounding):
- with VNNI, where fbgemm sums 8-bit products exactly, the matrices are packed for fbgemm and each activation
  row quantized in two int8 levels as each matmul runs;
- with AVX2 and no VNNI, where fbgemm's 8-bit sums saturate, int8_avx2.c (built on first use with the system's
  C compiler) multiplies the int8 weights by activation rows quantized to int16 (vpmaddwd): no packing, so the
  weights stay the prepared cache's mapped bytes, and the routed experts of a layer run in one call per matrix.
Elsewhere, and where neither is there, the weight-only path runs. bench/README.md has the figures, and
bench/bench_int8_kernels.py the other int8 matmuls torch offers, which did no better.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from ..decoder.layers import Attention, LatentAttention, SwiGLU
from ..decoder.moe import RoutedExperts
from . import int8_avx2
from .onednn import linear


# Rows quantized at a time: the float32 working copies then stay a few MiB, not a float32 copy of a layer's
# stacked experts (loading/memory.py counts them).
QUANTIZE_ROWS = 1024


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales) with weight ~= values * scales[..., None], one scale per output row."""
    if weight.is_meta:  # the shapes only: a model built to receive prepared weights (loading/prepared.py)
        return torch.empty(weight.shape, dtype=torch.int8, device="meta"), torch.empty(weight.shape[:-1], device="meta")
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
    # torch 2.13's kernel reads out of bounds (a segmentation fault, on an AVX-512 CPU) where the input width is not a
    # multiple of 16, e.g. 5 rows of 8 or 3 rows of 12: those convert the weight. Real models' widths are multiples of 64.
    if x.device.type == "cpu" and 0 < len(rows) <= int8_kernel_rows(x.dtype) and x.shape[-1] % 16 == 0:
        # float32 rows are rounded to bf16 on the way in, and the bf16 result widened back
        out = _INT8_MM(rows.to(torch.bfloat16), values, scale.to(torch.bfloat16)).to(x.dtype).reshape(*x.shape[:-1], -1)
    else:
        out = linear(x, values.to(x.dtype)) * scale.to(x.dtype)
    return out if bias is None else out + bias


# Up to this many rows of each compute dtype torch's int8 kernel beats converting the weight (the crossovers
# bench/bench_expert_read.py measured, in bench/README.md): more for float32 rows, since converting a weight to
# float32 writes four bytes a weight. Fixed numbers, not timings made at start-up: which path a row takes changes
# its rounding, and the same text must get the same vector in every process. float16 and float64 rows always
# convert the weight.
INT8_KERNEL_ROWS = {torch.bfloat16: 8, torch.float32: 16}


def int8_kernel_rows(dtype: torch.dtype) -> int:
    """The most rows of `dtype` sent to torch's weight-only int8 kernel (0 where this torch has none)."""
    return INT8_KERNEL_ROWS.get(dtype, 0) if _INT8_MM is not None else 0


# ---------------------------------------------------------------------------------------------------------------
# The integer path: int8 weights packed for fbgemm, activations quantized per row as each matmul runs.

_QLINEAR = getattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32", None)
# MOEE_INT8_KERNEL overrides the choice, for comparing kernels or for the same rounding as a machine where only one
# runs: weight-only, fbgemm, avx2, or integer (the integer kernel auto would prefer; each still needs its check passed).
KERNEL_ENV = "MOEE_INT8_KERNEL"
KERNEL_CHOICES = ("auto", "integer", "fbgemm", "avx2", "weight-only")
# Where the CPU sums int8 products exactly at 8 bits (VNNI), the integer path is chosen unless the probe finds it
# slower than the weight-only path: a guard against a kernel that is not what it should be, far from the ratio such
# CPUs show, so that the choice does not flip between processes (which would change the rounding).
INTEGER_MAX_TIME = 1.0


@dataclass(frozen=True)
class IntegerPath:
    """An integer kernel and how it quantizes activations.

    kernel "fbgemm": per row, to int8 levels of that row's largest |x|, and the rounding residual of those to int8
    levels again, both halves in one matmul of twice the rows. One level alone moved the vectors measurably further
    from float32's than the weight-only path (bench/README.md); with the residual (about 15 bits) the error is the
    weights' own. `bits` is 8 where the CPU's dot product sums u8 x s8 pairs exactly, 7 where it saturates at int16
    (AVX2's vpmaddubsw: two 255 x 127 products overflow it), as fbgemm's own reduce_range does.
    kernel "avx2": int8_avx2.c, each row to int16 levels of its largest |x| (bits 16), one matmul."""

    bits: int
    reason: str
    kernel: str = "fbgemm"

    @property
    def top(self) -> int:
        return 2 ** (self.bits - 1) - 1  # the largest level: a row's largest |x|

    @property
    def zero_point(self) -> int:
        return 2 ** (self.bits - 1)


@contextmanager
def _fbgemm():
    # Packing follows the quantized engine set at that moment; the packed weight runs fbgemm whatever it is later.
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        with warnings.catch_warnings():
            # torch 2.13 warns that quantized tensors are deprecated: the path is probed at start and falls back to
            # the weight-only one where a later torch lacks it.
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.backends.quantized.engine = previous


def pack_int8(values: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed form of int8 values [out, in] with float32 scales [out] (a copy in fbgemm's blocked layout)."""
    with _fbgemm():
        weight = torch._make_per_channel_quantized_tensor(
            values.contiguous(), scale.to(torch.float64), torch.zeros(len(scale), dtype=torch.int64), 0)
        return torch.ops.quantized.linear_prepack(weight, None)


def packed_linear(x: torch.Tensor, packed, path: IntegerPath, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T + bias for a weight packed by pack_int8, each row of x quantized in two int8 levels (IntegerPath)."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
    top = path.top
    # An all-zero row stays exactly zero (a floor, not float32's smallest normal, whose top / peak overflows to inf).
    peak = rows.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-30)
    levels = rows * (top / peak)  # in [-top, top]
    coarse = levels.round()
    fine = (levels - coarse).mul_(2 * top)  # the residual, in [-1/2, 1/2], to [-top, top]
    # Scale 1: the coarse half is whole numbers, which fbgemm's rounding keeps exactly, so what it drops is the fine
    # half's own rounding, half a step of the residual's levels.
    out = _QLINEAR(torch.cat([coarse, fine]), 1.0, path.zero_point, packed)
    out = out[: len(rows)].add_(out[len(rows) :], alpha=1 / (2 * top)).mul_(peak / top)
    out = out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias


def integer_path(dtype: torch.dtype) -> IntegerPath | None:
    """The integer path for int8 models computing in `dtype` on the CPU, or None where the weight-only path runs."""
    return _integer_decision(dtype, os.environ.get(KERNEL_ENV, "auto"))[0]


def integer_reason(dtype: torch.dtype) -> str:
    """Why integer_path(dtype) is what it is, in a few words."""
    return _integer_decision(dtype, os.environ.get(KERNEL_ENV, "auto"))[1]


@lru_cache(maxsize=None)
def _integer_decision(dtype: torch.dtype, asked: str) -> tuple[IntegerPath | None, str]:
    if asked not in KERNEL_CHOICES:
        return None, f"{KERNEL_ENV}={asked!r} is not one of {', '.join(KERNEL_CHOICES)}: the weight-only path"
    if asked == "weight-only":
        return None, f"weight-only int8 ({KERNEL_ENV}=weight-only)"
    if dtype != torch.float32:
        # bf16 compute runs where the CPU has bf16 dot products, and there bf16 matmuls are as fast as fbgemm's
        # int8 ones (bench/README.md); float16 and float64 keep the weight-only path as well.
        return None, f"weight-only int8 (the integer path is for float32 compute, not {str(dtype).removeprefix('torch.')})"
    has_fbgemm = _QLINEAR is not None and "fbgemm" in torch.backends.quantized.supported_engines
    bits = next((b for b in (8, 7) if _exact(b)), None) if has_fbgemm else None
    forced = f" ({KERNEL_ENV}={asked})" if asked != "auto" else ""
    if asked == "fbgemm" or (asked == "integer" and bits == 8):
        if bits is None:
            return None, "weight-only int8 (" + ("fbgemm's int8 products were not exact on this CPU)" if has_fbgemm
                                                 else "this torch has no fbgemm int8 kernels)")
        return _fbgemm_path(bits, forced)
    if asked in ("avx2", "integer") or bits != 8:
        lib, why = int8_avx2.library()
        if lib is not None:
            because = "" if forced else ", as fbgemm's int8 products saturate at 8 bits without VNNI"
            path = IntegerPath(16, f"int8 x int16 through AVX2 dot products (int8_avx2.c), activations in int16 per row{because}{forced}", "avx2")
            return path, path.reason
        if asked == "integer" and bits == 7:
            return _fbgemm_path(bits, forced)
        return None, f"weight-only int8 (no AVX2 integer kernel: {why})"
    ratio = _probe_ratio(IntegerPath(bits, ""), dtype)
    if ratio > INTEGER_MAX_TIME:
        return None, f"weight-only int8 (fbgemm's int8 x int8 took {ratio:.2f}x its time here)"
    path = IntegerPath(bits, f"int8 x int8 through fbgemm, activations in two {bits}-bit levels ({ratio:.2f}x weight-only's time here)")
    return path, path.reason


def _fbgemm_path(bits: int, forced: str) -> tuple[IntegerPath, str]:
    path = IntegerPath(bits, f"int8 x int8 through fbgemm, activations in two {bits}-bit levels{forced}")
    return path, path.reason


def int8_matmuls(reason: str | None) -> str:
    """The kernel a model's int8_kernel reason names, in a word: fbgemm, avx2 or weight-only (each rounds its own way,
    so a corpus job does not mix them)."""
    text = reason or ""
    return "fbgemm" if text.startswith("int8 x int8") else "avx2" if text.startswith("int8 x int16") else "weight-only"


def _exact(bits: int) -> bool:
    """Whether fbgemm's product equals the exact integer one for activation levels of `bits` bits: at the extremes
    (where an int16 sum of pairs saturates) and on random levels, for 1 and 5 rows. Rows that are whole levels with
    their largest |x| at the top level have no residual, so what comes back must be exact."""
    generator = torch.Generator().manual_seed(0)
    top = 2 ** (bits - 1) - 1
    path = IntegerPath(bits, "")
    for rows in (1, 5):
        levels = torch.randint(-top, top + 1, (rows, 256), generator=generator)
        levels[:, :64] = top  # every row reaches +-top: its scale is exactly 1
        levels[0, 64:] = top
        values = torch.randint(-127, 128, (32, 256), generator=generator, dtype=torch.int8)
        values[:8] = 127
        values[8:16] = -127
        expected = levels.double() @ values.double().T
        try:
            got = packed_linear(levels.float(), pack_int8(values, torch.ones(32)), path).double()
        except RuntimeError:
            return False
        if not torch.allclose(got, expected, rtol=1e-6, atol=0):
            return False
    return True


def _probe_ratio(path: IntegerPath, dtype: torch.dtype, shape: tuple[int, int] = (2048, 1024), repeats: int = 15) -> float:
    """The integer path's time / the weight-only path's for 16 and for 64 rows of one matrix of an expert's size
    (the larger of the two ratios), timed alternately as in precision.py's probe, on one thread: with two, a core
    taken by another process for a moment stalls whichever side is running, and the ratio swung widely between
    runs on a shared machine."""
    generator = torch.Generator().manual_seed(1)
    values, scale = quantize_rows(torch.randn(*shape, generator=generator))
    packed = pack_int8(values, scale)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _time_sides(path, dtype, values, scale, packed, shape[1], repeats, generator)
    finally:
        torch.set_num_threads(threads)


def _time_sides(path, dtype, values, scale, packed, size, repeats, generator) -> float:
    worst = 0.0
    with torch.inference_mode():
        for rows in (16, 64):
            x = torch.randn(rows, size, generator=generator).to(dtype)
            sides = (lambda: packed_linear(x, packed, path), lambda: int8_linear(x, values, scale))
            best = [float("inf"), float("inf")]
            for fn in sides:
                fn()
            for _ in range(repeats):
                for i, fn in enumerate(sides):
                    start = time.perf_counter()
                    fn()
                    best[i] = min(best[i], time.perf_counter() - start)
            worst = max(worst, best[0] / best[1])
    return worst


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        values, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("values", values)
        self.register_buffer("scale", scale)
        self.bias = linear.bias  # biases are tiny: kept as they are
        self.packed, self.path = None, None

    def pack_(self, path: IntegerPath) -> None:
        """Run through the integer path from now on. fbgemm: the values move into its packed copy (and leave the
        buffers); avx2: the values stay as they are."""
        self.path = path
        if path.kernel == "fbgemm":
            self.packed = pack_int8(self.values, self.scale)
            self.shape = tuple(self.values.shape)  # the matrix's, once its values live only in the packed copy
            self.values = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path is not None and x.device.type == "cpu":
            if self.packed is not None:
                return packed_linear(x, self.packed, self.path, self.bias)
            return int8_avx2.linear(x, self.values, self.scale, self.bias)
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
        self.packed, self.path, self._num_experts = None, None, len(gate_up_scale)

    @property
    def num_experts(self) -> int:
        return self._num_experts

    def pack_(self, path: IntegerPath) -> None:
        """As Int8Linear.pack_: for fbgemm each expert's two matrices packed, one at a time."""
        self.path = path
        if path.kernel != "fbgemm":
            return
        self.packed = [(pack_int8(self.gate_up_values[e], self.gate_up_scale[e]), pack_int8(self.down_values[e], self.down_scale[e]))
                       for e in range(self.num_experts)]
        self.shapes = (tuple(self.gate_up_values.shape), tuple(self.down_values.shape))  # as Int8Linear.shape
        self.gate_up_values = self.down_values = None

    def mix(self, x, token_of, slot_weights, counts) -> torch.Tensor:
        """With the avx2 kernel: every expert's rows in one call per matrix (grouped by expert, as `forward` sorts
        them): each row's result is what a call per expert gives it, and the outputs are added in the same order."""
        if self.path is None or self.path.kernel != "avx2" or x.device.type != "cpu":
            return super().mix(x, token_of, slot_weights, counts)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        hidden = int8_avx2.matmul(x[token_of], self.gate_up_values, self.gate_up_scale, offsets)
        expert_of = torch.repeat_interleave(torch.arange(self.num_experts), counts) if self.gate_up_bias is not None else None
        if expert_of is not None:
            hidden = hidden + self.gate_up_bias[expert_of]
        gate, up = hidden.chunk(2, dim=-1)
        out = int8_avx2.matmul(self.activate(gate, up), self.down_values, self.down_scale, offsets)
        if expert_of is not None:
            out = out + self.down_bias[expert_of]
        return torch.zeros_like(x).index_add_(0, token_of, (out * slot_weights).to(x.dtype))

    def run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up_bias, down_bias = self.biases(expert)
        if self.packed is not None and x.device.type == "cpu":
            gate_up, down = self.packed[expert]
            gate, up = packed_linear(x, gate_up, self.path, gate_up_bias).chunk(2, dim=-1)
            return packed_linear(self.activate(gate, up), down, self.path, down_bias)
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


def pack_block_(block: nn.Module, path: IntegerPath) -> None:
    """Move the int8 matrices of one quantized block onto the integer path (integer_path)."""
    for module in block.modules():
        if isinstance(module, (Int8Linear, Int8RoutedExperts)) and module.path is None:
            module.pack_(path)
