"""The `moee` command line.

Exit codes: 0 success; 1 an expected error (bad file, bad model, bad input),
printed as one line without a traceback (add --verbose for one); 2 a usage
error, from argparse.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from .errors import MoEERefError


class UsageError(Exception):
    """Wrong combination of command-line options (exit 2)."""


def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="SRC", help="local checkpoint directory or hub id (owner/name)")


def cmd_demo(ns: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_model
    from .demo import BANNER, DEMO_TEXT, demo_checkpoints
    from .info import format_facts, format_routing_table, model_facts, routing_table
    from .tokenizer import Tokenizer

    print(BANNER)
    for family, path in demo_checkpoints(Path(ns.dir)).items():
        model = load_model(path)
        tokenizer = Tokenizer.from_dir(path)
        print(f"\n=== {family}: {path}")
        print(format_facts(model_facts(model.args, tokenizer)))
        batch = tokenizer.encode_batch([DEMO_TEXT])
        with torch.inference_mode():
            out = model(batch.input_ids, batch.attention_mask)
        print(f"\nrouting at the last token of {DEMO_TEXT!r} ({batch.lengths[0]} tokens):")
        print(format_routing_table(routing_table(out, row=0, position=-1)))
    return 0


def cmd_info(ns: argparse.Namespace) -> int:
    from .checkpoint import resolve_source
    from .config import read_config
    from .info import format_facts, model_facts
    from .tokenizer import Tokenizer

    directory = resolve_source(ns.model)
    args = read_config(directory)
    tokenizer = Tokenizer.from_dir(directory) if (directory / "tokenizer.json").is_file() else None
    facts = model_facts(args, tokenizer)
    print(json.dumps(facts, indent=2) if ns.json else format_facts(facts))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moee", description="MoE embeddings (HS, RW, MoEE) from OLMoE, Qwen1.5-MoE and DeepSeekMoE.")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="build small random checkpoints offline and show what moee-ref sees in them")
    demo.add_argument("--dir", default="demo-checkpoints", help="where to build them (default: %(default)s)")
    demo.set_defaults(run=cmd_demo)

    info = commands.add_parser("info", help="facts about a checkpoint: layers, experts, parameters, memory, tokenizer")
    add_model(info)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.run(ns)
    except UsageError as exc:
        parser.error(str(exc))  # exits 2
    except (MoEERefError, OSError) as exc:
        if ns.verbose:
            traceback.print_exc()
        print(f"moee {ns.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"moee {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
