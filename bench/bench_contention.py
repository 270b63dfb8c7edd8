"""Embedding speed under CPU contention: quiet, and with busy processes beside it, per OpenMP wait setting.

    python bench/bench_contention.py                 # OLMoE dimensions, 2 layers, bf16 where native; 1 busy process
    python bench/bench_contention.py --busy 2

Each row runs in a child process (the OpenMP runtime reads its wait setting once, as torch loads it):
moee-ref's default (GOMP_SPINCOUNT=3000, moee_ref/threads_wait.py), OpenMP's own default (a spin of 300000),
OMP_WAIT_POLICY=PASSIVE and other spin counts. Each is timed quiet and with --busy processes spinning in pure Python
beside it (their number against the cores is the CPU taken away), at batch 32 and at batch 1. The
checkpoint is bench_precision.py's (random weights, bf16), built once in --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {
    "moee-ref default (spin 3000)": {},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "OpenMP default (spin 300000)": {"GOMP_SPINCOUNT": "300000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=5000": {"GOMP_SPINCOUNT": "5000"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
}


def child(directory: str, batch: int, reps: int) -> None:
    from moee_ref import MoEEmbedder  # first: before torch, as the `moee` command imports it

    from bench_precision import OPTIONS, prompts

    embedder = MoEEmbedder.from_pretrained(directory)
    texts = prompts(batch)
    for _ in range(2):
        embedder.features(texts, OPTIONS, batch_size=batch)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        embedder.features(texts, OPTIONS, batch_size=batch)
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times), "dtype": str(embedder.model.dtype)}))


def run(directory: Path, env: dict, busy: int, batch: int, reps: int) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        out = subprocess.run([sys.executable, __file__, "--child", str(directory), "--batch", str(batch), "--reps", str(reps)],
                             env={**environment, **env}, capture_output=True, text=True, check=True)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=1, help="busy processes beside the embedding (default 1)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "moee-ref-bench"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.batch, args.reps)

    from bench_precision import ensure_checkpoint

    directory = ensure_checkpoint(Path(args.workdir) / f"olmoe-{args.layers}layers-bf16", "olmoe", args.layers)
    cores = len(os.sched_getaffinity(0))
    print(f"olmoe, {args.layers} layers of the real dimensions, {cores} cores, {args.busy} busy process(es) beside it; "
          "seconds per call (median of --reps)")
    print(f"{'wait setting':<32} {'b32 quiet':>9} {'b32 busy':>9} {'ratio':>6} {'b1 quiet':>9} {'b1 busy':>9} {'ratio':>6}")
    rows = {}
    for name, env in VARIANTS.items():
        runs = {f"{label}{batch}": run(directory, env, busy, batch, args.reps)
                for batch in (32, 1) for label, busy in (("quiet", 0), ("busy", args.busy))}
        row = {key: r["seconds"] for key, r in runs.items()}
        dtypes = {r["dtype"] for r in runs.values()}
        rows[name] = row
        print(f"{name:<32} {row['quiet32']:>9.3f} {row['busy32']:>9.3f} {row['busy32'] / row['quiet32']:>6.2f} "
              f"{row['quiet1']:>9.3f} {row['busy1']:>9.3f} {row['busy1'] / row['quiet1']:>6.2f}  {', '.join(sorted(dtypes))}")
    base = rows["moee-ref default (spin 3000)"]
    print("busy / moee-ref default quiet, b32 and b1: " + "; ".join(
        f"{name}: {r['busy32'] / base['quiet32']:.2f}, {r['busy1'] / base['quiet1']:.2f}" for name, r in rows.items()))


if __name__ == "__main__":
    main()
