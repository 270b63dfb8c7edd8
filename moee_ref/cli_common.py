"""What every `moee` command shares: the parser class, usage errors, argument types, model loading.

Kept apart from cli.py so that cli.py and analysis_cli.py use the very same
UsageError class, also when cli.py runs as __main__ (python -m moee_ref.cli).
"""

from __future__ import annotations

import argparse

EXIT_ERROR, EXIT_USAGE, EXIT_MISMATCH = 1, 2, 3


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) naming the command and pointing at --help."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UsageError(Exception):
    """Options that parse but do not fit together (exit 2)."""


def load_embedder(ns):
    import torch

    from .embedding.embedder import MoEEmbedder
    from .embedding.prompts import resolve_prompt

    if getattr(ns, "prompt", None) is not None and getattr(ns, "mode", "default") == "default":
        resolve_prompt(ns.prompt)  # an unknown prompt is reported before minutes of loading, not after
    return MoEEmbedder.from_pretrained(
        ns.model,
        dtype=getattr(torch, ns.dtype),
        int8=getattr(ns, "int8", False),
        memory_budget=getattr(ns, "memory_budget", None),
        spill_dir=getattr(ns, "spill_dir", None),
        share_prefix=not getattr(ns, "no_shared_prefix", False),
    )


def int_at_least(minimum: int):
    """An argparse type for integers >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)


def add_model(p) -> None:
    p.add_argument("--model", required=True, metavar="SRC", help="local checkpoint directory or hub id (owner/name)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"], help="compute dtype (default float32; bf16 is very slow on CPUs without bf16 units)")
