#!/usr/bin/env python
"""The int8 matmuls torch offers on the CPU, on one matrix of an expert's size: time per call and packing time.

    python bench/bench_int8_kernels.py                      # 1 thread, OLMoE's expert shapes
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 python bench/bench_int8_kernels.py

Candidates, each computing x @ W.T for int8 W with a float32 scale per row:
- weight-only: kernels/int8.py's int8_linear (torch's _weight_int8pack_mm for a few rows, else the weight converted)
- fbgemm: kernels/int8.py's packed_linear, int8 x int8 with activations in two int8 levels per row (what the loader
  uses where its probe chooses it)
- onednn: torch.ops.onednn.qlinear_pointwise on the same two-level uint8 activations, its weight prepacked
- int_mm: torch._int_mm (int8 x int8 -> int32) on the same activations, the weight stored transposed
- torchao, where it is installed (pip install torchao; not a dependency): its dynamic int8 x int8 Linear
- avx2: kernels/int8_avx2.py, int8 x int16 with AVX2's vpmaddwd, activations in int16 per row (what the loader uses
  on AVX2 without VNNI), where it builds
onednn and int_mm are checked against fbgemm (exact integer sums agree to float32 rounding); a * marks a
time whose results did not agree (int8 sums that saturate under that ISA).
Timings are the best of --reps calls, the candidates taking turns.
"""

from __future__ import annotations

import argparse
import time

import moee_ref  # noqa: F401  first, before torch: its OpenMP wait setting applies
import torch

from moee_ref.kernels import int8 as K
from moee_ref.kernels import int8_avx2


def two_levels(x: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(coarse and fine levels stacked [2M, K] as whole numbers, the per-row factor back to x's scale)."""
    peak = x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    levels = x * (top / peak)
    coarse = levels.round()
    return torch.cat([coarse, (levels - coarse).mul_(2 * top).round_()]), peak / top


def combine(acc: torch.Tensor, factor: torch.Tensor, top: int) -> torch.Tensor:
    m = len(factor)
    return acc[:m].float().add_(acc[m:].float(), alpha=1 / (2 * top)).mul_(factor)


def torchao_linear(values: torch.Tensor, scale: torch.Tensor):
    """torchao's int8 x int8 (Int8DynamicActivationInt8WeightConfig: its own per-row quantization of the same
    dequantized weight, one int8 level of activations), where torchao is installed; else None."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return None
    linear = torch.nn.Linear(values.shape[1], values.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(values.float() * scale[:, None])
    quantize_(linear, Int8DynamicActivationInt8WeightConfig())

    def run(x):
        with torch.inference_mode():
            return linear(x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,4,16,64,256")
    parser.add_argument("--shapes", default="2048x1024,1024x2048,2048x2048", help="out x in of each matrix")
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bits = next((b for b in (8, 7) if K._exact(b)), None)
    if bits is None:
        raise SystemExit("fbgemm's int8 products are not exact on this CPU (or this torch has none)")
    path, top, zp = K.IntegerPath(bits, ""), 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    print(f"torch {torch.__version__}, ATen capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), "
          f"fbgemm exact with {bits}-bit activation levels; microseconds per call, best of {args.reps}")
    generator = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        values, scale = K.quantize_rows(torch.randn(n, k, generator=generator))
        start = time.perf_counter()
        packed = K.pack_int8(values, scale)
        fbgemm_pack = time.perf_counter() - start
        start = time.perf_counter()
        onednn_weight = torch.ops.onednn.qlinear_prepack(values, None)
        onednn_pack = time.perf_counter() - start
        transposed = values.t().contiguous()
        zeros = torch.zeros(n, dtype=torch.long)

        def onednn(x):
            stacked, factor = two_levels(x, top)
            acc = torch.ops.onednn.qlinear_pointwise((stacked + zp).to(torch.uint8), 1.0, zp, onednn_weight, scale, zeros,
                                                     None, 1.0, 0, torch.float32, "none", [], "")
            return combine(acc, factor, top)

        def int_mm(x):
            stacked, factor = two_levels(x, top)
            return combine(torch._int_mm(stacked.to(torch.int8), transposed), factor, top) * scale

        sides = {"weight-only": lambda x: K.int8_linear(x, values, scale), "fbgemm": lambda x: K.packed_linear(x, packed, path),
                 "onednn": onednn, "int_mm": int_mm}
        torchao = torchao_linear(values, scale)
        if torchao is not None:
            sides["torchao"] = torchao
        if int8_avx2.library()[0] is not None:
            sides["avx2"] = lambda x: int8_avx2.linear(x, values, scale)
        print(f"\n{n} x {k}: packing for fbgemm {1e3 * fbgemm_pack:.1f} ms, for onednn {1e3 * onednn_pack:.1f} ms")
        print(f"{'rows':>5} " + " ".join(f"{name:>12}" for name in sides) + "   fbgemm / weight-only   avx2 / weight-only")
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, k, generator=generator)
            reference = sides["fbgemm"](x)
            # Not exact here (an ISA whose int8 sums saturate): timed anyway, marked with *
            inexact = {name for name in ("onednn", "int_mm")
                       if not torch.allclose(sides[name](x), reference, rtol=1e-4, atol=1e-3 * float(reference.abs().max()))}
            best = {name: float("inf") for name in sides}
            for fn in sides.values():
                fn(x)
            for _ in range(args.reps):
                for name, fn in sides.items():
                    start = time.perf_counter()
                    fn(x)
                    best[name] = min(best[name], time.perf_counter() - start)
            print(f"{rows:>5} " + " ".join(f"{1e6 * best[name]:>11.0f}{'*' if name in inexact else ' '}" for name in best)
                  + f"   {best['fbgemm'] / best['weight-only']:>20.2f}x"
                  + (f"   {best['avx2'] / best['weight-only']:>17.2f}x" if "avx2" in best else ""))

if __name__ == "__main__":
    main()
