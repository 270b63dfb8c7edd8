"""What every `moee` command shares: the parser class, usage errors, argument types, model loading.

Kept apart from cli.py so that cli.py and analysis_cli.py use the very same
UsageError class, also when cli.py runs as __main__ (python -m moee_ref.cli).
"""

from __future__ import annotations

import argparse
import signal
from contextlib import contextmanager

EXIT_ERROR, EXIT_USAGE, EXIT_MISMATCH = 1, 2, 3
# What `timeout`, systemd, docker and Kubernetes send (SIGTERM), and a closed terminal (SIGHUP).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):
    """A stop signal arrived. Raised in the main thread like KeyboardInterrupt for Ctrl-C, so that every
    `finally` runs: the temporary output and the spill directory are removed before the process ends."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_signals_unwind():
    """SIGTERM and SIGHUP raise Stopped instead of killing the process outright; a second one during the
    cleanup is ignored, so the cleanup finishes. A signal the caller ignores (nohup) stays ignored."""

    def stop(signum, frame):
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def comma_list(text: str) -> list[str]:
    """An option's comma-separated values, blanks dropped ("STS12, SICK-R," -> ["STS12", "SICK-R"])."""
    return [part.strip() for part in text.split(",") if part.strip()]


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) naming the command and pointing at --help."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UsageError(Exception):
    """Options that parse but do not fit together (exit 2)."""


def load_embedder(ns):
    """The embedder the options ask for. Where they name no mode (no --dtype, --int8 or --memory-budget), the
    first mode that fits this process's memory: the auto dtype resident, then int8, then layer-streamed."""
    import sys

    from .embedding.embedder import MoEEmbedder
    from .embedding.prompts import resolve_prompt
    from .kernels.precision import resolve_device, resolve_dtype
    from .loading.checkpoint import choose_mode

    if getattr(ns, "prompt", None) is not None and getattr(ns, "mode", "default") == "default":
        resolve_prompt(ns.prompt)  # an unknown prompt is reported before minutes of loading, not after
    device = resolve_device(ns.device)
    int8, budget = getattr(ns, "int8", False), getattr(ns, "memory_budget", None)
    if ns.dtype is None and not int8 and budget is None and device.type == "cpu":
        mode, note = choose_mode(ns.model, resolve_dtype("auto", device)[0], ns.memory_limit)
        if note:
            print(f"moee: {note}", file=sys.stderr)
        int8, budget = mode.int8, mode.memory_budget
    return MoEEmbedder.from_pretrained(
        ns.model,
        dtype=ns.dtype or "auto",  # resolved there again (the probe runs once), so the report keeps its reason
        int8=int8,
        memory_budget=budget,
        spill_dir=getattr(ns, "spill_dir", None),
        share_prefix=not getattr(ns, "no_shared_prefix", False),
        memory_limit=ns.memory_limit,
        device=device,
        cache_dir=getattr(ns, "cache_dir", None),
        prepared_cache=not getattr(ns, "no_prepared_cache", False),
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
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float64", "bfloat16"],
                   help="compute dtype (default auto: bfloat16 where this machine computes it natively, else float32; "
                        "float32 and float64 are the exact reference modes)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="auto (default: a CUDA device where torch has one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="memory this process may use, e.g. 12GB, instead of what the system reports (a shared node); "
                        "a mode that needs more is refused, or another chosen, before any weight is read")
