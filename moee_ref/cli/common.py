"""What every `moee` command shares: the parser class, usage errors, argument types, model loading.

Kept apart from main.py so that main.py and analyze.py use the very same
UsageError class, also when cli.py runs as __main__ (python -m moee_ref.cli.main).
"""

from __future__ import annotations

import argparse
import signal
from contextlib import contextmanager

from ..errors import Stopped  # noqa: F401  (raised here; the jobs catch it too)

EXIT_ERROR, EXIT_USAGE, EXIT_MISMATCH = 1, 2, 3
# What `timeout`, systemd, docker and Kubernetes send (SIGTERM), and a closed terminal (SIGHUP).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


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


from ..errors import UsageError  # noqa: E402,F401  (options that do not fit together: exit 2)


def load_embedder(ns):
    """The embedder the options ask for. Where they name no mode (no --dtype, --int8 or --memory-budget), the
    first mode that fits this process's memory (from_pretrained's fit="auto"), said on stderr."""
    import sys

    from ..embedding.embedder import MoEEmbedder
    from ..embedding.prompts import resolve_prompt

    if getattr(ns, "prompt", None) is not None and getattr(ns, "mode", "default") == "default":
        resolve_prompt(ns.prompt)  # an unknown prompt is reported before minutes of loading, not after
    embedder = MoEEmbedder.from_pretrained(
        ns.model,
        dtype=ns.dtype or "auto",
        int8=getattr(ns, "int8", False),
        memory_budget=getattr(ns, "memory_budget", None),
        spill_dir=getattr(ns, "spill_dir", None),
        share_prefix=not getattr(ns, "no_shared_prefix", False),
        memory_limit=ns.memory_limit,
        device=ns.device,
        fit="auto" if ns.dtype is None else None,
        cache_dir=getattr(ns, "cache_dir", None),
        prepared_cache=not getattr(ns, "no_prepared_cache", False),
    )
    if embedder.load_note and not getattr(ns, "quiet", False):
        print(f"moee: {embedder.load_note}", file=sys.stderr)
    return embedder


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
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float64", "bfloat16", "float16"],
                   help="compute dtype (default auto: bfloat16 where this machine computes it natively, else float32; "
                        "float32 and float64 are the exact reference modes; float16 as the API takes it)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="auto (default: a CUDA device where torch has one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="memory this process may use, e.g. 12GB, instead of what the system reports (a shared node); "
                        "a mode that needs more is refused, or another chosen, before any weight is read")


# ------------------------------------------------------------------ the EmbedSpec's flags


def parse_alpha(text: str):
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number >= 0 or 'auto', got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"alpha must be a finite number >= 0, got {text!r}")
    return value


class GivenAlpha(argparse.Action):
    """--alpha, remembering that it was given (a kind that does not use alpha refuses it then)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.alpha_given = True


def parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 1,2,5; got {text!r}") from None


def spec_flags() -> dict[str, tuple[tuple[str, ...], dict]]:
    """One flag per EmbedSpec field (embedding/spec.py), with one meaning in every command that takes it."""
    from ..embedding.kinds import KINDS
    from ..embedding.spec import ENSEMBLES, HS_LAYERS, MODES, POOLINGS, RW_VALUES

    return {
        "kind": (("--kind",), dict(choices=list(KINDS), default="moee-sum", help="embedding kind (default %(default)s)")),
        "prompt": (("--prompt",), dict(default=None, help="built-in prompt name (see `moee prompts`) or a template with {text}; default none")),
        "alpha": (("--alpha",), dict(type=parse_alpha, default=1.0, action=GivenAlpha,
                                     help="moee-sum weight of RW: a number >= 0 or 'auto' (default %(default)s)")),
        "pooling": (("--pooling",), dict(choices=POOLINGS, default="last", help="token pooling for HS and RW (default last)")),
        "hs_layer": (("--hs-layer",), dict(choices=HS_LAYERS, default="last", help="HS from the last layer or the mean of all layers")),
        "rw_values": (("--rw-values",), dict(choices=RW_VALUES, default="probs", help="routing weights as probabilities or raw logits")),
        "rw_layers": (("--rw-layers",), dict(type=parse_layers, default=None, metavar="L1,L2,...", help="MoE layers to use for RW (default all)")),
        "max_length": (("--max-length",), dict(type=positive_int, default=None,
                                               help="token budget per prompted text (default: the model's maximum); "
                                                    "what is over it is refused unless --truncation says which side to cut")),
        "truncation": (("--truncation",), dict(choices=["left", "right"], default=None,
                                               help="cut over-long texts on this side, the text never the prompt (default: refuse them)")),
        "allow_empty": (("--allow-empty",), dict(action="store_true", help="embed empty lines (the prompt alone) instead of refusing them")),
        "normalize": (("--normalize",), dict(action="store_true", help="scale every vector to unit length")),
        "standardizers": (("--standardizer",), dict(dest="standardizer", action="append", default=None, metavar="FILE.npz",
                                                    help="fitted standardizer for the hs or rw component (repeatable)")),
        "mode": (("--mode",), dict(choices=MODES, default="default", help="'official' reproduces the authors' code (see README)")),
        "instruction": (("--instruction",), dict(default=None, metavar="TEXT",
                                                 help="official mode: an instruction before every sentence, in their GritLM format")),
        "ensemble": (("--ensemble",), dict(choices=ENSEMBLES, default=None,
                                           help="official mode: moee-sum of per-batch standardised HS and RW (default) or of the raw ones")),
    }


def add_spec_flags(p, *names: str, **changes) -> None:
    """Add the flags of these EmbedSpec fields; changes: {field: {argparse keyword: value}} for one command
    (another default or help text, never another meaning)."""
    table = spec_flags()
    for name in names:
        flags, keywords = table[name]
        p.add_argument(*flags, **{**keywords, **changes.get(name, {})})
