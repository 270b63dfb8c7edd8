"""What a resumable corpus job (moee_ref/corpus.py) costs against one encode() call, and what chunk size
costs in the layer-streamed mode, where every chunk reads all the weights again.

    python bench/bench_corpus.py                  # 2000 texts on the demo OLMoE checkpoint
    python bench/bench_corpus.py --texts 400      # quick

Rows, each run in this process after a warm-up: one encode() of the corpus (no files), `moee embed`
with the automatic chunk size, with chunks of one batch (the worst case: a save and an fsync per
batch), and a resume of a job whose first half was saved; then the streamed mode with chunks of one
batch and of the whole corpus, and how many times it read the checkpoint's tensors. Every job's
output is checked to be the bytes of the first job's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import moee_ref  # noqa: F401  first, before torch: its OpenMP wait setting applies (moee_ref/threads_wait.py)
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moee_ref import MoEEmbedder  # noqa: E402
from moee_ref.cli import main as cli
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint  # noqa: E402
from moee_ref.loading import checkpoint as checkpoint_module  # noqa: E402

WORDS = "the a cat rain market music river stone light paper number garden city".split()


def corpus(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + (i * 13) % 40)) for i in range(n)]


def timed(function) -> float:
    began = time.perf_counter()
    function()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    try:
        model = write_random_checkpoint(work / "olmoe", SMALL_CONFIGS["olmoe"], seed=3)
        texts = corpus(args.texts)
        (work / "texts.txt").write_text("\n".join(texts) + "\n")
        base = ["embed", "--model", str(model), "--input", str(work / "texts.txt"), "--dtype", "float32",
                "--batch-size", str(args.batch_size), "--no-progress"]

        def job(name: str, *more: str, reference: str = "auto") -> float:
            output = work / f"{name}.npy"
            seconds = timed(lambda: cli.main([*base, "--output", str(output), *more]) == 0 or sys.exit(f"{name} failed"))
            first = work / f"{reference}.npy"
            if first.exists() and output != first:
                assert output.read_bytes() == first.read_bytes(), f"{name}: not the bytes of {first.name}"
            return seconds

        embedder = MoEEmbedder.from_pretrained(model, dtype=torch.float32)
        embedder.encode(texts[:64], batch_size=args.batch_size)  # warm-up
        rows = [("one encode() call, no files", timed(lambda: embedder.encode(texts, batch_size=args.batch_size, show_progress_bar=False)))]
        rows.append(("moee embed, automatic chunk size", job("auto")))
        rows.append((f"moee embed, --chunk-size {args.batch_size} (one batch)", job("batch", "--chunk-size", str(args.batch_size))))
        # A job interrupted half-way: its first half saved (chunks of half the corpus), then resumed.
        half = args.texts // 2 // args.batch_size * args.batch_size
        from moee_ref.io import outputs

        real = outputs.write_embeddings
        outputs.write_embeddings = lambda *a, **k: (_ for _ in ()).throw(OSError("stop here"))
        cli.main([*base, "--output", str(work / "resumed.npy"), "--chunk-size", str(half)])
        outputs.write_embeddings = real
        parts = work / "resumed.npy.parts"
        for chunk in sorted(parts.glob("chunk-*.json"))[1:]:  # keep the first half only
            chunk.unlink()
        rows.append((f"--resume with {half} of {args.texts} rows saved", job("resumed", "--resume", "--chunk-size", str(half))))

        reads: Counter = Counter()
        real_read = checkpoint_module._OpenShards.read

        def counting(self, name):
            reads[name] += 1
            return real_read(self, name)

        checkpoint_module._OpenShards.read = counting
        for name, size in (("streamed, one batch per chunk", args.batch_size), ("streamed, one chunk", args.texts)):
            reads.clear()
            size = -(-size // args.batch_size) * args.batch_size
            seconds = job(name.replace(" ", "-").replace(",", ""), "--kind", "hs", "--memory-budget", "1GB", "--chunk-size", str(size),
                          reference="streamed-one-batch-per-chunk")
            passes = max(reads.values())
            rows.append((f"{name} ({passes} reads of each tensor)", seconds))
        checkpoint_module._OpenShards.read = real_read

        print(f"{args.texts} texts, batch {args.batch_size}, {args.threads} thread(s), demo OLMoE (random, tiny)")
        for label, seconds in rows:
            print(f"  {label:<58} {seconds:7.2f} s  {args.texts / seconds:8.0f} texts/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
