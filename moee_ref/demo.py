"""The offline demo: build a small random checkpoint of each family and show what moee-ref sees in it."""

from __future__ import annotations

import sys
from pathlib import Path

from .synthetic import SMALL_CONFIGS, write_random_checkpoint

DEMO_TEXT = "Mixture-of-experts routers give embeddings for free."
BANNER = (
    "These checkpoints are RANDOM: built here, offline, with the real tensor layout and config.json of each\n"
    "family but tiny dimensions and meaningless weights. Everything below is real computation by moee-ref,\n"
    "but the routing means nothing. For a real model pass a hub id or a local directory with --model."
)


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
