"""The offline demo: build a small random checkpoint of each family and run the `moee` commands on them."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path
from typing import Callable

from .checkpoints import SMALL_CONFIGS, write_random_checkpoint

BANNER = f"""\
moee-ref demo, offline.
The {len(SMALL_CONFIGS)} checkpoints below (one per family) are RANDOM: built here with each family's real config.json layout,
tensor names, sharding and tokenizer conventions, but tiny dimensions and meaningless weights.
Every number is real computation by moee-ref; none of it means anything about language.
With network, the same commands take a real model, e.g. --model allenai/OLMoE-1B-7B-0924."""

DEMO_TEXTS = [
    "A man is playing a guitar.",
    "Someone plays music on a guitar.",
    "The stock market fell sharply today.",
    "Shares dropped steeply this afternoon.",
    "A cat is sleeping on the sofa.",
    "The weather is cold and rainy.",
    "A kitten naps on the couch.",
    "It is a warm and sunny day.",  # eight distinct texts: what alpha "auto" needs to choose
]

# Hand-made pairs with similarity scores 0-5, in the STS format.
DEMO_PAIRS = [
    ("A man is playing a guitar.", "Someone plays music on a guitar.", 4.2),
    ("The stock market fell sharply today.", "Shares dropped steeply this afternoon.", 4.5),
    ("A cat is sleeping on the sofa.", "A kitten naps on the couch.", 4.0),
    ("The weather is cold and rainy.", "It is a warm and sunny day.", 1.0),
    ("A woman is slicing an onion.", "A woman is cutting an onion.", 4.8),
    ("A dog runs in the park.", "The committee approved the budget.", 0.0),
    ("Children are playing football.", "Kids play soccer outside.", 4.1),
    ("He bought a new car.", "He purchased a vehicle.", 4.3),
    ("The train was late again.", "The meeting starts at noon.", 0.4),
    ("She is reading a book.", "A woman reads a novel.", 3.9),
    ("The plane landed safely.", "The aircraft touched down without trouble.", 4.6),
    ("A boy is eating pizza.", "A man is riding a horse.", 0.5),
]


def demo_checkpoints(root: Path, stream=sys.stderr) -> dict[str, Path]:
    """One small checkpoint per family under root, built once and reused."""
    paths = {}
    for family, config in SMALL_CONFIGS.items():
        path = root / f"tiny-{family}"
        if not (path / "config.json").is_file():
            print(f"building random {family} checkpoint in {path}", file=stream)
            write_random_checkpoint(path, config, dtype="bfloat16", seed=7, max_shard_bytes=256 * 1024)
        paths[family] = path
    return paths


def write_demo_data(root: Path) -> tuple[Path, Path]:
    texts, pairs = root / "texts.txt", root / "pairs.tsv"
    texts.write_text("\n".join(DEMO_TEXTS) + "\n", encoding="utf-8")
    rows = ["sentence1\tsentence2\tscore"] + [f"{a}\t{b}\t{s}" for a, b, s in DEMO_PAIRS]
    pairs.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return texts, pairs


def run_demo(root: Path, run: Callable[[list[str]], int]) -> int:
    print(BANNER)
    root.mkdir(parents=True, exist_ok=True)
    paths = demo_checkpoints(root)
    texts, pairs = write_demo_data(root)
    # Each command on a different family: the first, second and last registered.
    first, second, last = (str(path) for path in (*list(paths.values())[:2], list(paths.values())[-1]))
    steps = [["info", "--model", str(p)] for p in paths.values()]
    steps += [
        ["prompts"],
        ["route", "--model", last, "--prompt", "prompteol", "Routers are embeddings too."],
        ["embed", "--model", first, "--input", str(texts), "--output", str(root / "embeddings.npy"), "--kind", "moee-sum", "--prompt", "prompteol", "--alpha", "auto"],
        ["eval", "sts", "--model", second, "--pairs", str(pairs), "--prompt", "prompteol"],
    ]
    if importlib.util.find_spec("transformers") is not None:
        steps += [["verify", "--model", str(p)] for p in paths.values()]
    else:
        print("\n(moee verify skipped: transformers is not installed; `make test` installs it)")
    for argv in steps:
        print(f"\n$ moee {shlex.join(argv)}", flush=True)
        code = run(argv)
        sys.stdout.flush()
        if code != 0:
            print(f"demo step failed with exit code {code}", file=sys.stderr)
            return code
    print("\nDone. The checkpoints stay in", root, "for you to try other commands on.")
    return 0
