#!/usr/bin/env python
"""How fast can one expert matrix be streamed at batch 1? The kernels against the read bandwidth.

Run by hand (bench/README.md):

    python bench/bench_expert_read.py                 # OLMoE's gate_up shape [2048, 2048], 5 rows, 48 experts
    python bench/bench_expert_read.py --rows 1 --out 2816
    python bench/bench_expert_read.py --rows 1,2,4,8,12,16   # one line per row count

At batch 1 a 40-token prompt reaches nearly every expert of a layer with a
handful of rows each, so every expert matrix is read once from memory. This
script holds --experts distinct fp32 matrices (far beyond the caches), runs
x [rows, in] @ W.T through each in turn with each matmul path, and prints the
bytes of weights streamed per second next to the read bandwidth of a 1 GiB sum
measured in the same run (best of --reps for every figure).
"""

from __future__ import annotations

import argparse
import os
import time

import moee_ref  # noqa: F401  first, before torch: its OpenMP wait setting applies (moee_ref/threads_wait.py)
import torch

from moee_ref.kernels.onednn import _ONEDNN_LINEAR, linear, pack_weight, packing_available


def best_seconds(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="5", help="rows per expert (tokens routed to it), or a comma-separated list; default 5")
    p.add_argument("--in", dest="inputs", type=int, default=2048, help="input width (default 2048)")
    p.add_argument("--out", type=int, default=2048, help="output width (default 2048: OLMoE's gate and up, fused)")
    p.add_argument("--experts", type=int, default=48, help="distinct matrices cycled through (default 48)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    row_counts = [int(r) for r in args.rows.split(",")]
    weights = [torch.randn(args.out, args.inputs) for _ in range(args.experts)]
    total = args.experts * args.out * args.inputs * 4
    big = torch.ones(1 << 28)
    paths = {"F.linear (torch's default: MKL)": (weights, torch.nn.functional.linear)}
    if packing_available():
        paths["oneDNN, plain weights"] = (weights, lambda x, w: _ONEDNN_LINEAR(x, w, None, "none", [], ""))
        paths["oneDNN, packed weights (moee-ref)"] = ([pack_weight(w) for w in weights], linear)

    print(f"{args.experts} fp32 matrices [{args.out} x {args.inputs}] ({total / 2**30:.2f} GiB), "
          f"{args.threads} threads, best of {args.reps}")
    for rows in row_counts:
        xs = [torch.randn(rows, args.inputs) for _ in range(args.experts)]
        bandwidth = big.numel() * 4 / best_seconds(big.sum, args.reps)
        print(f"{rows} rows each; read bandwidth, 1 GiB fp32 sum: {bandwidth / 1e9:.1f} GB/s")
        for name, (matrices, fn) in paths.items():
            for x, w in zip(xs, matrices):  # warm-up: kernels built for these shapes
                fn(x, w)
            seconds = best_seconds(lambda: [fn(x, w) for x, w in zip(xs, matrices)], args.reps)
            rate = total / seconds
            gflops = 2 * rows * total / 4 / seconds / 1e9
            print(f"  {name:36s} {rate / 1e9:6.1f} GB/s of weights = {rate / bandwidth:4.0%} of the sum's bandwidth"
                  f" ({gflops:.0f} GFLOP/s)")
        print(f"  read bandwidth again: {big.numel() * 4 / best_seconds(big.sum, args.reps) / 1e9:.1f} GB/s")

if __name__ == "__main__":
    main()
