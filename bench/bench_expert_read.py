#!/usr/bin/env python
"""How fast can one expert matrix be streamed at batch 1? The kernels against the read bandwidth.

Run by hand (bench/README.md):

    python bench/bench_expert_read.py                 # OLMoE's gate_up shape [2048, 2048], 5 rows, 48 experts
    python bench/bench_expert_read.py --rows 1 --out 2816
    python bench/bench_expert_read.py --rows 1,2,4,8,12,16   # one line per row count
    python bench/bench_expert_read.py --precision bf16,int8 --rows 1,4,8,16,32   # the bf16 and int8 kernels

At batch 1 a 40-token prompt reaches nearly every expert of a layer with a
handful of rows each, so every expert matrix is read once from memory. This
script holds --experts distinct fp32 matrices (far beyond the caches), runs
x [rows, in] @ W.T through each in turn with each matmul path, and prints the
bytes of weights streamed per second next to the read bandwidth of a 1 GiB sum
measured in the same run (best of --reps for every figure).

--precision bf16 and int8 add the kernels of those modes, each on its own
copies of the matrices (bf16 as stored; int8 quantized per row as the int8 mode
holds them): bf16 F.linear with bf16 rows; torch's weight-only int8 kernel
(`_weight_int8pack_mm`, which the int8 mode uses up to INT8_KERNEL_ROWS rows);
the weight converted to bf16 and multiplied (its path above that); and, for the
record, oneDNN's int8 x int8 matmul with the rows quantized per row
(`onednn.qlinear_pointwise`: int8 activations, which the int8 mode does not
use). Each is also given as its time against bf16's. On a CPU that computes
bf16 slowly (dtype "auto" chooses float32 there) the yardstick is the float32
mode's packed matmul instead, and int8 is converted to float32: that is what
the int8 mode computes in there, with its float32 rows rounded to bf16 for the
int8 kernel.
"""

from __future__ import annotations

import argparse
import os
import time

import moee_ref  # noqa: F401  first, before torch: its OpenMP wait setting applies (moee_ref/threads_wait.py)
import torch

from moee_ref.kernels.int8 import quantize_rows
from moee_ref.kernels.onednn import _ONEDNN_LINEAR, linear, pack_weight, packing_available
from moee_ref.kernels.precision import resolve_dtype


def best_seconds(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def int8_activations_matmul():
    """x @ (values * scale).T through oneDNN's int8 x int8 matmul, x quantized per row (exact int32 sums), or None."""
    qlinear = getattr(getattr(torch.ops, "onednn", None), "qlinear_pointwise", None)
    if qlinear is None or not torch.backends.mkldnn.is_available():
        return None, None

    def pack(values, scale):
        return torch.ops.onednn.qlinear_prepack(values, None), scale, torch.zeros(len(values), dtype=torch.int64)

    def matmul(x, packed):
        weight, scale, zeros = packed
        x = x.float()
        row_scale = x.abs().amax(1, keepdim=True).div_(127.0).clamp_(min=1e-30)
        q = x.div(row_scale).add_(128.5).clamp_(1, 255).to(torch.uint8)  # round half up, uint8 around 128
        return qlinear(q, 1.0, 128, weight, scale, zeros, None, 1.0, 0, torch.float32, "none", [], "").mul_(row_scale)

    return pack, matmul


YARDSTICKS = {torch.bfloat16: "bf16 F.linear (bf16 mode)", torch.float32: "oneDNN, packed weights (moee-ref)"}


def packed_fp32_path(weights: list[torch.Tensor]) -> tuple:
    """The float32 mode's matmul: oneDNN with the weights packed."""
    return [pack_weight(w) for w in weights], linear, 4


def precision_paths(weights: list[torch.Tensor], compute: torch.dtype, have: dict) -> dict:
    """name: (matrices, fn, bytes per weight) for the bf16 and int8 kernels, after the yardstick they are timed
    against (taken from `have`, the paths already built, where it is there); int8 converted to `compute`."""
    int8 = [quantize_rows(w) for w in weights]
    yardstick = YARDSTICKS[compute]
    if yardstick in have:
        paths = {yardstick: have[yardstick]}
    elif compute == torch.bfloat16:
        paths = {yardstick: ([w.bfloat16() for w in weights], lambda x, w: torch.nn.functional.linear(x.bfloat16(), w), 2)}
    else:
        paths = {yardstick: packed_fp32_path(weights)}
    if hasattr(torch, "_weight_int8pack_mm"):
        paths["int8 weight-only kernel"] = (
            [(v, s.bfloat16()) for v, s in int8], lambda x, w: torch._weight_int8pack_mm(x.bfloat16(), *w), 1)
    name = "bf16" if compute == torch.bfloat16 else "float32"
    paths[f"int8 converted to {name}, then {name}"] = (
        int8, lambda x, w: torch.nn.functional.linear(x.to(compute), w[0].to(compute)) * w[1].to(compute), 1)
    pack, matmul = int8_activations_matmul()
    if pack is not None:
        paths["int8 x int8, rows quantized (oneDNN)"] = ([pack(v, s) for v, s in int8], matmul, 1)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="5", help="rows per expert (tokens routed to it), or a comma-separated list; default 5")
    p.add_argument("--in", dest="inputs", type=int, default=2048, help="input width (default 2048)")
    p.add_argument("--out", type=int, default=2048, help="output width (default 2048: OLMoE's gate and up, fused)")
    p.add_argument("--experts", type=int, default=48, help="distinct matrices cycled through (default 48)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--precision", default="fp32", help="fp32, bf16, int8 or a comma-separated list (default fp32)")
    args = p.parse_args()
    precisions = set(args.precision.split(","))
    if not precisions <= {"fp32", "bf16", "int8"}:
        p.error(f"--precision takes fp32, bf16 and int8, not {args.precision!r}")
    torch.set_num_threads(args.threads)

    row_counts = [int(r) for r in args.rows.split(",")]
    weights = [torch.randn(args.out, args.inputs) for _ in range(args.experts)]
    total = args.experts * args.out * args.inputs * 4
    big = torch.ones(1 << 28)
    paths = {}
    if "fp32" in precisions:
        paths["F.linear (torch's default: MKL)"] = (weights, torch.nn.functional.linear, 4)
        if packing_available():
            paths["oneDNN, plain weights"] = (weights, lambda x, w: _ONEDNN_LINEAR(x, w, None, "none", [], ""), 4)
            paths[YARDSTICKS[torch.float32]] = packed_fp32_path(weights)
    compute = resolve_dtype("auto")[0]  # bf16 where this CPU computes it natively, else float32
    yardstick = YARDSTICKS[compute]
    if precisions & {"bf16", "int8"}:
        paths.update({name: path for name, path in precision_paths(weights, compute, paths).items()
                      if name.split()[0] in precisions or name == yardstick})  # the yardstick of the int8 rows

    print(f"{args.experts} fp32 matrices [{args.out} x {args.inputs}] ({total / 2**30:.2f} GiB), "
          f"{args.threads} threads, best of {args.reps}; auto dtype here: {str(compute).removeprefix('torch.')}")
    for rows in row_counts:
        xs = [torch.randn(rows, args.inputs) for _ in range(args.experts)]
        bandwidth = big.numel() * 4 / best_seconds(big.sum, args.reps)
        print(f"{rows} rows each; read bandwidth, 1 GiB fp32 sum: {bandwidth / 1e9:.1f} GB/s")
        yardstick_seconds = None
        for name, (matrices, fn, width) in paths.items():
            for x, w in zip(xs, matrices):  # warm-up: kernels built for these shapes
                fn(x, w)
            seconds = best_seconds(lambda: [fn(x, w) for x, w in zip(xs, matrices)], args.reps)
            yardstick_seconds = seconds if name == yardstick else yardstick_seconds
            rate = total / 4 * width / seconds
            gflops = 2 * rows * total / 4 / seconds / 1e9
            against = f", {seconds / yardstick_seconds:.2f}x {yardstick.split(' (')[0]}'s time" if yardstick_seconds and name != yardstick else ""
            print(f"  {name:38s} {1e3 * seconds / args.experts:6.3f} ms a matrix, {rate / 1e9:6.1f} GB/s of weights as held"
                  f" = {rate / bandwidth:4.0%} of the sum's bandwidth ({gflops:.0f} GFLOP/s){against}")
        print(f"  read bandwidth again: {big.numel() * 4 / best_seconds(big.sum, args.reps) / 1e9:.1f} GB/s")

if __name__ == "__main__":
    main()
