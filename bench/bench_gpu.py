"""moee-ref bf16 against transformers bf16 (sdpa) on a CUDA device, at a real family's dimensions and full depth.

    python bench/bench_gpu.py                        # OLMoE dimensions, all 16 layers, cuda:0
    python bench/bench_gpu.py --layers 4 --batch-large 64

For each side (timed as bench_precision.py times: every call ends with its vectors on the host, so
nothing is left queued on the device): load time (host files to the device), texts/s at --batch-large, ms per text at batch 1,
peak device memory, and the cosine of HS and RW rows between the two sides. The checkpoint (random
weights, bf16, as bench_cpu.py builds it) is written once in --workdir and reused: OLMoE's 16 layers
are 13.8 GB there. Both sides run in this process, one after the other, the first freed before the
second loads. Without a CUDA device it stops at once, saying so (exit 2).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import hf_features, load_hf  # noqa: E402
from bench_precision import CONFIGS, OPTIONS, cosines, ensure_checkpoint, prompts, timed  # noqa: E402

from moee_ref import MoEEmbedder  # noqa: E402
from moee_ref.families import FAMILIES  # noqa: E402
from moee_ref.loading.tokenizer import Tokenizer  # noqa: E402


def side(name: str, load, run, texts, batch1, reps) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = load()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    (hs, rw), rate, b1_ms = timed(partial(run, model), texts, batch1, reps)
    result = {"load_s": load_s, "texts_per_s": rate, "b1_ms": b1_ms, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "hs": hs, "rw": rw}
    del model
    gc.collect()
    print(f"  {name}: done", file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="olmoe", choices=sorted(FAMILIES))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the released model's)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--texts", type=int, default=None, help="texts in the large batch (default --batch-large)")
    parser.add_argument("--batch-large", type=int, default=32)
    parser.add_argument("--batch1", type=int, default=8, help="texts timed one at a time")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "moee-ref-bench"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"bench_gpu.py needs a CUDA device; torch {torch.__version__} sees none here (a CPU build, or no GPU). "
              "The CPU benchmarks are bench_cpu.py and bench_precision.py.", file=sys.stderr)
        return 2

    layers = args.layers or json.loads((CONFIGS / f"{args.family}.json").read_text())["num_hidden_layers"]
    directory = Path(args.workdir) / f"{args.family}-{layers}layers-bf16"
    if not (directory / "config.json").is_file():
        print(f"writing a random {args.family} checkpoint of {layers} layers to {directory} ...", file=sys.stderr)
    ensure_checkpoint(directory, args.family, layers)
    texts = prompts(args.texts or args.batch_large)
    tokenizer = Tokenizer.from_dir(directory)
    attention = "eager" if args.family == "gpt_oss" else "sdpa"  # gpt-oss's sinks: eager only in transformers

    results = {
        "moee-ref bf16": side(
            "moee-ref", lambda: MoEEmbedder.from_pretrained(directory, dtype=torch.bfloat16, device=args.device),
            lambda e, t: (lambda f: (f.hs, f.rw))(e.features(t, OPTIONS, batch_size=len(t))), texts, args.batch1, args.reps),
        f"transformers bf16 {attention}": side(
            "transformers", lambda: load_hf(directory, torch.bfloat16, attn_implementation=attention).to(args.device),
            lambda m, t: hf_features(m, tokenizer, t, args.device), texts, args.batch1, args.reps),
    }
    ours, theirs = results.values()
    print(f"{args.family}, {layers} layers of the real dimensions, {len(texts)} texts (random weights), "
          f"{torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
    print(f"{'side':<26} {'load s':>7} {'texts/s':>9} {'b1 ms':>7} {'peak GiB':>9}")
    for name, r in results.items():
        print(f"{name:<26} {r['load_s']:>7.1f} {r['texts_per_s']:>9.1f} {r['b1_ms']:>7.1f} {r['peak_gib']:>9.2f}")
    print(f"moee-ref / transformers: {ours['texts_per_s'] / theirs['texts_per_s']:.2f}x texts/s at batch {len(texts)}, "
          f"{ours['b1_ms'] / theirs['b1_ms']:.2f}x the time at batch 1; cosine of the two sides' rows: "
          f"HS min {cosines(ours['hs'], theirs['hs']).min():.5f}, RW min {cosines(ours['rw'], theirs['rw']).min():.5f}")
    if args.json:
        Path(args.json).write_text(json.dumps({name: {k: v for k, v in r.items() if not isinstance(v, np.ndarray)}
                                               for name, r in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
