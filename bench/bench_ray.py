"""Texts per second of `moee embed` on this machine: the local job, and --engine ray with 1 and 2 workers.

    python bench/bench_ray.py                 # 1000 texts on a random OLMoE-shaped model, hidden 512
    python bench/bench_ray.py --texts 200     # quick

Each run is the whole command in a child process (Ray's start and shutdown included, and the model's
loading, once per worker); the Ray outputs are checked to equal the local job's within float32 rounding.
Needs the distributed extra (ray[data]).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint  # noqa: E402

WORDS = "the a cat rain market music river stone light paper number garden city".split()
MEDIUM = {**SMALL_CONFIGS["olmoe"], "hidden_size": 512, "intermediate_size": 256, "num_attention_heads": 8,
          "num_key_value_heads": 8, "num_hidden_layers": 4, "num_experts": 16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    try:
        model = write_random_checkpoint(work / "olmoe", MEDIUM, seed=4)
        texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + (i * 13) % 40)) for i in range(args.texts)]
        (work / "texts.txt").write_text("\n".join(texts) + "\n")
        base = [sys.executable, "-m", "moee_ref.cli.main", "embed", "--model", str(model), "--input", str(work / "texts.txt"),
                "--dtype", "float32", "--batch-size", str(args.batch_size), "--no-progress"]
        runs = [("local job, 1 thread", ["--output", str(work / "local.npy")]),
                ("ray, 1 worker x 1 CPU", ["--output", str(work / "ray1.npy"), "--engine", "ray", "--workers", "1"]),
                ("ray, 2 workers x 1 CPU", ["--output", str(work / "ray2.npy"), "--engine", "ray", "--workers", "2"])]
        print(f"{args.texts} texts, batch {args.batch_size}, OLMoE-shaped random model (hidden 512, 4 layers, 16 experts), "
              f"{os.cpu_count()} CPUs")
        for label, more in runs:
            began = time.perf_counter()
            proc = subprocess.run([*base, *more], capture_output=True, text=True, env=env)
            seconds = time.perf_counter() - began
            if proc.returncode:
                sys.exit(f"{label} failed:\n{proc.stderr}")
            print(f"  {label:<26} {seconds:7.1f} s  {args.texts / seconds:7.1f} texts/s")
        local = np.load(work / "local.npy")
        for name in ("ray1", "ray2"):  # float32 rounding: max |difference| / max |value| (the README's measure)
            error = np.abs(np.load(work / f"{name}.npy") - local).max() / np.abs(local).max()
            assert error < 1e-5, f"{name}: {error:.2g} from the local job"
            print(f"  {name}: max |difference| / max |value| against the local job: {error:.1g}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
