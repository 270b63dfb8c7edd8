#!/usr/bin/env python
"""Memory estimate against measured peak RSS, per loading mode (loading/memory.py).

Run by hand, not in CI (bench/README.md):

    python bench/bench_memory.py --family olmoe --layers 2

On the random checkpoint with the family's real dimensions that bench_cpu.py
builds (same --workdir), each mode runs in a child process of its own: the
estimate the loader checks before reading any weight, then the load and one
encode of 32 PromptEOL texts at batch 32, then the child's peak RSS. The
estimate must not be below the peak (a refusal that lets a kill through) and
should not be far above it (a refusal of a mode that would have fitted).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = {"float32": ("float32", False), "bfloat16": ("bfloat16", False), "int8": ("auto", True)}


def child(directory: Path, mode: str) -> dict:
    import torch

    from bench_cpu import make_texts
    from moee_ref import MoEEmbedder, Tokenizer
    from moee_ref.families import name_map_groups, read_config
    from moee_ref.kernels import packing_available
    from moee_ref.kernels.precision import resolve_dtype
    from moee_ref.loading.checkpoint import ShardReader, shard_files
    from moee_ref.loading.memory import resident_need

    torch.set_num_threads(os.cpu_count())
    dtype_name, int8 = MODES[mode]
    dtype, _ = resolve_dtype(dtype_name)
    groups = name_map_groups(read_config(directory))
    groups[-1] = {k: v for k, v in groups[-1].items() if k != "lm_head.weight"}
    packed = dtype == torch.float32 and not int8 and packing_available()
    estimate = resident_need(groups, ShardReader(shard_files(directory)), dtype, int8, packed)
    texts = make_texts(Tokenizer.from_dir(directory), 32)
    start = time.perf_counter()
    embedder = MoEEmbedder.from_pretrained(directory, dtype=dtype, int8=int8)
    load_s = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in list(embedder.model.parameters()) + list(embedder.model.buffers()))
    embedder.encode(texts, "moee-concat", prompt="prompteol", batch_size=32)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "dtype": str(dtype).removeprefix("torch."), "estimate": estimate, "peak_rss": peak,
            "weights": weights, "load_s": load_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="olmoe")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("~/.cache/moee-ref-bench").expanduser())
    p.add_argument("--modes", default="float32,bfloat16,int8")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.dir, args.child)))
        return
    from bench_cpu import ensure_checkpoint

    directory = ensure_checkpoint(args.workdir.expanduser(), args.family, args.layers)
    print(f"{args.family}, {args.layers} layers of the real dimensions, {directory}")
    print(f"{'mode':<10} {'dtype':<9} {'weights GiB':>11} {'estimate GiB':>12} {'peak RSS GiB':>12} {'peak/estimate':>13} "
          f"{'peak - weights':>14} {'load s':>7}")
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", str(directory)], capture_output=True, text=True)
        if out.returncode:
            print(f"{mode}: failed\n{out.stderr}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        g = 2**30
        print(f"{mode:<10} {r['dtype']:<9} {r['weights'] / g:>11.2f} {r['estimate'] / g:>12.2f} {r['peak_rss'] / g:>12.2f} "
              f"{r['peak_rss'] / r['estimate']:>13.2f} {(r['peak_rss'] - r['weights']) / g:>14.2f} {r['load_s']:>7.1f}")


if __name__ == "__main__":
    main()
