"""`moee analyze`: the paper's analyses of HS and RW from the command line.

    moee analyze prompts         --model SRC --pairs FILE [--prompts none,prompteol,...] [--png FILE]
    moee analyze complementarity --model SRC --input FILE --clusters K [--seed 0] [--sample-pairs N]
    moee analyze errors          --model SRC --pairs FILE [--threshold 0.2] [--show N]

cli.build_parser registers them with add_analyze_commands(commands, add_model).
The statistics live in moee_ref.evaluation.analysis; this module reads the inputs, calls
them and prints a table or JSON (--json; undefined values are null).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..evaluation.analysis import DEFAULT_SAMPLE_PAIRS, DEFAULT_THRESHOLD, ERROR_GROUP_TITLES, ERROR_GROUPS
from .common import Parser, UsageError, add_spec_flags, comma_list, int_at_least, load_embedder, positive_int

# --------------------------------------------------------------------------- argument types


def _parse_prompt_names(text: str) -> list[str]:
    from ..embedding.prompts import BUILTIN_PROMPTS, list_prompts

    names = comma_list(text)
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated prompt names like none,prompteol; got {text!r}")
    resolved = []
    for name in names:
        key = name.lower().replace("-", "_").replace(" ", "_")
        if key not in BUILTIN_PROMPTS:
            valid = ", ".join(n for n, _ in list_prompts())
            raise argparse.ArgumentTypeError(f"unknown prompt {name!r}; choose built-in names from: {valid}")
        if key in resolved:
            raise argparse.ArgumentTypeError(f"prompt {name!r} is given twice")
        resolved.append(key)
    return resolved


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] (a share of the normalised ranking), got {text!r}")
    return value


# --------------------------------------------------------------------------- helpers


def _options(ns, prompt=None):
    from ..embedding.embedder import FeatureOptions

    return FeatureOptions(prompt=prompt, max_length=ns.max_length, truncation=ns.truncation)


def _progress(ns):
    return False if ns.no_progress else None


def _jsonable(value):
    """NaN and infinities become null, so that the output is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _print_result(ns, result: dict, format_text) -> None:
    """--json: the result with the model it came from, as JSON; otherwise format_text's table."""
    if ns.json:
        print(json.dumps(_jsonable({"model": str(ns.model), **result}), indent=2))
    else:
        print(format_text(result))


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _has_score_column(path: str, fmt: str | None) -> bool:
    """Whether a pair file gives scores: a score column in a TSV/CSV header, or a score key in any JSONL record."""
    from ..io.inputs import PAIR_FORMATS

    file = Path(path)
    if not file.is_file():
        return False  # read_pairs reports the missing file
    fmt = fmt or file.suffix.lower().lstrip(".")
    if fmt not in PAIR_FORMATS:
        return False  # read_pairs reports the unknown format
    try:
        content = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return False  # read_pairs reports it
    if fmt == "jsonl":
        for line in content.split("\n"):
            if '"score"' not in line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "score" in record:
                return True
        return False
    header = content.split("\n", 1)[0].split("\t" if fmt == "tsv" else ",")
    return "score" in (h.strip().strip('"') for h in header)


def read_pairs_optional_scores(path: str, fmt: str | None = None):
    """Pairs with their gold scores when the file has a score column, else with scores=None."""
    from ..io.inputs import read_pairs

    return read_pairs(path, fmt, require_scores=_has_score_column(path, fmt))


# --------------------------------------------------------------------------- prompts


def cmd_analyze_prompts(ns) -> int:
    from ..evaluation.analysis import plot_prompt_robustness, prompt_robustness

    if ns.pairs == "-":
        raise UsageError("--pairs takes a file here, not - (standard input)")
    if ns.png:
        from ..evaluation.plot import check_picture_path

        check_picture_path(ns.png)  # fail before the work when matplotlib is missing or the file cannot be written
    pairs = read_pairs_optional_scores(ns.pairs, ns.format)
    embedder = load_embedder(ns)
    result = prompt_robustness(
        embedder, pairs, ns.prompts, options=_options(ns), batch_size=ns.batch_size, show_progress_bar=_progress(ns),
    )
    if ns.png:
        plot_prompt_robustness(result, ns.png, f"HS and RW under {len(result['prompts'])} prompts, {result['pairs']} pairs")
    _print_result(ns, result, format_prompts)
    if ns.png:
        print(f"wrote {ns.png}", file=sys.stderr)
    return 0


def format_prompts(result: dict) -> str:
    names, p = result["prompts"], len(result["prompts"])
    lines = [f"Spearman correlation between the cosine similarities of {result['pairs']} pairs, HS and RW under {p} prompt(s)"]
    lines.append("prompts: " + ", ".join(f"{i} {name}" for i, name in enumerate(names, start=1)))
    short = [f"HS{i}" for i in range(1, p + 1)] + [f"RW{i}" for i in range(1, p + 1)]
    lines.append(" " * 5 + "".join(f"{s:>6}" for s in short))
    for label, row in zip(short, result["matrix"]):
        lines.append(f"{label:<5}" + "".join(f"{_num(v, 2):>6}" for v in row))
    means = result["block_means"]
    lines.append(
        f"block means (off-diagonal): HS-HS {_num(means['hs_hs'])}  RW-RW {_num(means['rw_rw'])}  "
        f"HS-RW {_num(means['hs_rw'])} (same prompt {_num(means['hs_rw_same_prompt'])})"
    )
    if result["constant"]:
        lines.append("constant similarities (correlation undefined): " + ", ".join(result["constant"]))
    gold = result["gold"]
    if gold is None:
        lines.append("no gold scores in the pair file: no per-prompt Spearman against gold")
    else:
        width = max(8, *(len(n) for n in names))
        lines.append("")
        lines.append(f"Spearman against gold per prompt\n{'prompt':<{width}}  {'HS':>8}  {'RW':>8}")
        for name in names:
            lines.append(f"{name:<{width}}  {_num(gold['hs'][name]):>8}  {_num(gold['rw'][name]):>8}")
        for stat in ("mean", "variance"):
            lines.append(f"{stat:<{width}}  {_num(gold['summary']['hs'][stat]):>8}  {_num(gold['summary']['rw'][stat]):>8}")
    if result["truncated"]:
        lines.append(f"{result['truncated']} texts truncated")
    return "\n".join(lines)


# --------------------------------------------------------------------------- complementarity


def cmd_complementarity(ns) -> int:
    from ..evaluation.analysis import complementarity, require_analysis_extra
    from ..io.inputs import read_texts

    require_analysis_extra()  # before loading the model
    texts = read_texts(ns.input, ns.field)
    embedder = load_embedder(ns)
    result = complementarity(
        embedder, texts, ns.clusters, ns.seed, ns.sample_pairs,
        options=_options(ns, ns.prompt), batch_size=ns.batch_size, show_progress_bar=_progress(ns),
    )
    _print_result(ns, result, format_complementarity)
    return 0


def format_complementarity(result: dict) -> str:
    agreement = result["agreement"]
    sampled = "all pairs" if result["sampled_pairs"] == result["total_pairs"] else f"sampled from {result['total_pairs']}, seed {result['seed']}"
    lines = [
        f"k-means, k={result['clusters']} (seed {result['seed']}, n_init {result['n_init']}), on HS and on RW separately: "
        f"{result['texts']} texts, prompt {result['prompt']}",
        f"cluster sizes  HS {result['cluster_sizes']['hs']}  RW {result['cluster_sizes']['rw']}",
        f"AMI             {_num(agreement['ami'])}",
        f"NMI             {_num(agreement['nmi'])}",
        f"pair Jaccard    {_num(agreement['jaccard'])}",
        f"exact matching  {100 * agreement['exact_match']:.2f}%",
        f"Spearman(HS cosine, RW cosine) over {result['sampled_pairs']} pairs ({sampled}): {_num(result['similarity_spearman'])}",
    ]
    lines += [f"note: {note}" for note in result["notes"]]
    if result["truncated"]:
        lines.append(f"{result['truncated']} texts truncated")
    return "\n".join(lines)


# --------------------------------------------------------------------------- errors


def cmd_errors(ns) -> int:
    from ..evaluation.analysis import error_analysis_for_pairs
    from ..io.inputs import read_pairs

    pairs = read_pairs(ns.pairs, ns.format)
    embedder = load_embedder(ns)
    result = error_analysis_for_pairs(
        embedder, pairs, ns.threshold, ns.show,
        options=_options(ns, ns.prompt), batch_size=ns.batch_size, show_progress_bar=_progress(ns),
    )
    _print_result(ns, result, format_errors)
    return 0


def format_errors(result: dict) -> str:
    counts, shares = result["counts"], result["shares"]
    lines = [
        f"{result['pairs']} pairs, prompt {result['prompt']}: a pair fails for an embedding when "
        f"|normalised rank by similarity - normalised rank by gold| > {result['threshold']:g}",
        f"pairs where at least one fails: {result['failing_pairs']} of {result['pairs']}",
    ]
    for group in ERROR_GROUPS:
        share = "n/a" if shares[group] is None else f"{100 * shares[group]:5.1f}%"
        lines.append(f"  {ERROR_GROUP_TITLES[group]:<22} {counts[group]:>6}  {share:>6}")
    lines.append(f"  {'both succeed':<22} {counts['both_succeed']:>6}")
    lines.append(f"Spearman against gold: HS {_num(result['spearman']['hs'])}, RW {_num(result['spearman']['rw'])}")
    which = {"hs_succeeds_rw_fails": "RW", "hs_fails_rw_succeeds": "HS", "both_fail": "either"}
    for group in ERROR_GROUPS:
        examples = result["examples"][group]
        if not examples:
            continue
        lines.append("")
        lines.append(f"{ERROR_GROUP_TITLES[group]} (largest rank error of {which[group]} first):")
        for ex in examples:
            lines.append(
                f"  pair {ex['index']}: gold {ex['gold']:g}  HS {ex['sim_hs']:.3f} (rank error {ex['rank_error_hs']:+.2f})  "
                f"RW {ex['sim_rw']:.3f} (rank error {ex['rank_error_rw']:+.2f})"
            )
            lines.append(f"    1: {ex.get('sentence1', '')}")
            lines.append(f"    2: {ex.get('sentence2', '')}")
    if result["truncated"]:
        lines.append(f"{result['truncated']} texts truncated")
    return "\n".join(lines)


# --------------------------------------------------------------------------- parser


def add_analyze_commands(commands, add_model) -> None:
    """Register `analyze` and its subcommands on the top-level subparsers object of cli.build_parser."""
    parser_class = getattr(commands, "_parser_class", None) or Parser

    def common(q) -> None:
        add_model(q)
        q.add_argument("--batch-size", type=positive_int, default=16, help="texts per forward pass (default %(default)s)")
        add_spec_flags(q, "max_length", "truncation")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.add_argument("--json", action="store_true", help="print JSON (undefined values are null)")

    p = commands.add_parser("analyze", help="the paper's analyses of HS and RW: prompt robustness, complementarity, error analysis")
    analyses = p.add_subparsers(dest="suite", required=True, metavar="ANALYSIS", parser_class=parser_class)

    q = analyses.add_parser(
        "prompts",
        help="Figures 4 and 5: Spearman between HS and RW pair similarities under several prompts; with gold, each prompt's score",
    )
    common(q)
    q.add_argument("--pairs", required=True, metavar="FILE", help="TSV/CSV with header sentence1,sentence2[,score], or JSONL with those keys")
    q.add_argument("--format", choices=["tsv", "csv", "jsonl"], default=None, help="pair file format (default: from the name)")
    q.add_argument("--prompts", type=_parse_prompt_names, default=None, metavar="NAME,...", help="built-in prompt names (default: all ten, see `moee prompts`)")
    q.add_argument("--png", metavar="FILE", default=None, help="heatmap and per-prompt spread (needs the plot extra)")
    q.set_defaults(run=cmd_analyze_prompts)

    q = analyses.add_parser(
        "complementarity",
        help="Table 1: k-means on HS and on RW, AMI/NMI/pair Jaccard/exact matching, Spearman of their similarities (needs the analysis extra)",
    )
    common(q)
    q.add_argument("--input", required=True, metavar="FILE|-", help="texts, one per line ('-' for stdin); .jsonl files are read by --field")
    q.add_argument("--field", default=None, help="JSONL field holding the text (default 'text' for .jsonl input)")
    q.add_argument("--clusters", required=True, type=int_at_least(2), metavar="K", help="number of k-means clusters (>= 2)")
    q.add_argument("--seed", type=int_at_least(0), default=0, help="k-means and pair-sampling seed (default %(default)s)")
    q.add_argument("--sample-pairs", type=int_at_least(2), default=DEFAULT_SAMPLE_PAIRS, metavar="N",
                   help="text pairs for the similarity Spearman (default %(default)s; all pairs if fewer)")
    q.add_argument("--prompt", default=None, help="prompt name or template with {text} (default none)")
    q.set_defaults(run=cmd_complementarity)

    q = analyses.add_parser("errors", help="Figure 2, Tables 6 and 7: pairs HS ranks well and RW badly, and the reverse")
    common(q)
    q.add_argument("--pairs", required=True, metavar="FILE", help="TSV/CSV with header sentence1,sentence2,score, or JSONL with those keys")
    q.add_argument("--format", choices=["tsv", "csv", "jsonl"], default=None, help="pair file format (default: from the name)")
    q.add_argument("--threshold", type=_threshold, default=DEFAULT_THRESHOLD,
                   help="a pair fails when |normalised rank by similarity - normalised rank by gold| exceeds this (default %(default)s)")
    q.add_argument("--show", type=int_at_least(0), default=5, metavar="N", help="pairs listed per group (default %(default)s)")
    q.add_argument("--prompt", default=None, help="prompt name or template with {text} (default none)")
    q.set_defaults(run=cmd_errors)
