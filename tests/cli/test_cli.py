"""The `moee` command line, run as a subprocess (python -m moee_ref.cli.main) on small random checkpoints.

Every subprocess pays for importing torch, so the commands the selected tests
need are all started at once on a thread pool (the `runs` fixture) and each
test waits for its own results. Numbers the CLI prints or writes are
recomputed here from the Python API. Every command and error class runs as
a subprocess at least once; further variants whose handling is cli.py's own
(argparse, readers, option checks) run in process through cli.main, which
is what the subprocess runs too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

# One torch thread here as in the subprocesses (OMP_NUM_THREADS=1): the same sums in the same order.
from embed_fixtures import single_thread  # noqa: F401  (an autouse fixture)
from moee_ref.embedding.official import encode_official
from moee_ref.kernels.precision import resolve_dtype
from moee_ref import MoEEmbedder, Tokenizer, load_model, read_config
from moee_ref.cli import main as cli
from moee_ref.embedding.prompts import BUILTIN_PROMPTS
from moee_ref.embedding.stats import pearson, spearman
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WORKERS = (os.cpu_count() or 2) + 1
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
HAVE_MTEB = importlib.util.find_spec("moee_ref.evaluation.mteb") is not None and importlib.util.find_spec("mteb") is not None
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

TEXTS = [
    "A man is playing a guitar.",
    "The stock market fell sharply today, and analysts were surprised.",
    "Cats sleep.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Rain",
]
MANY = [f"text number {i} about {['cats', 'rain', 'markets', 'music'][i % 4]}" for i in range(300)]
ROUTE_TEXTS = ["A man is playing a guitar.", "Rain."]
PAIRS = [
    ("A man is playing a guitar.", "Someone plays music on a guitar.", 4.2),
    ("The stock market fell sharply today.", "Shares dropped, steeply, this afternoon.", 4.5),
    ("A cat is sleeping on the sofa.", 'The weather is "cold" and rainy.', 0.5),
    ("A woman is slicing an onion.", "A woman is cutting an onion.", 4.8),
    ("A dog runs in the park.", "The committee approved the budget.", 0.0),
    ("Children are playing football.", "Kids play soccer outside.", 4.1),
    ("He bought a new car.", "He purchased a vehicle.", 4.3),
    ("The train was late again.", "The meeting starts at noon.", 0.4),
    ("She is reading a book.", "A woman reads a novel.", 3.9),
]
DEV_PAIRS = [
    ("A boy is eating pizza.", "A man is riding a horse.", 0.5),
    ("The plane landed safely.", "The aircraft touched down.", 4.6),
    ("It is cold.", "It is freezing.", 4.0),
    ("Birds sing.", "Taxes rose.", 0.2),
]


# ----------------------------------------------------------------------------- helpers


def moee(*args, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moee_ref.cli.main", *map(str, args)],
        input=stdin, capture_output=True, text=True, env=env or ENV, timeout=600,
    )


def in_process(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of cli.main in this process."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse's usage errors and --help
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def show(result) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def ok(result) -> subprocess.CompletedProcess:
    assert result.returncode == 0, show(result)
    return result


# The compute dtype an embed without --dtype runs in on this machine (bfloat16 where it is native).
AUTO = str(resolve_dtype("auto")[0]).removeprefix("torch.")


def summary_lines(stderr: str) -> list[str]:
    """stderr's lines, the throughput that ends the summary line dropped (it varies from run to run)."""
    return [re.sub(r"; [0-9.]+ texts/s, [0-9]+ tokens/s$", "", line) for line in stderr.splitlines()]


def one_line_error(result, code: int, message: str, stdout_empty: bool = True) -> None:
    """Exit `code` and exactly one stderr line, equal to `message` (no traceback)."""
    assert result.returncode == code, show(result)
    assert "Traceback" not in result.stderr, show(result)
    assert result.stderr.splitlines() == [message], show(result)
    if stdout_empty:
        assert result.stdout == "", show(result)


def default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def load_npy(path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def routing_alone(directory: Path, text: str):
    """(token ids, decoder output) of one unpadded text, straight from the model."""
    model = load_model(directory)
    ids = Tokenizer.from_dir(directory).encode(text)
    with torch.inference_mode():
        return ids, model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))


def csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"') else text


def jsonl_pairs(pairs) -> str:
    return "".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in pairs)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-ckpts")
    paths = {}
    for seed, family in enumerate(SMALL_CONFIGS, start=31):
        paths[family] = root / family
        write_random_checkpoint(paths[family], SMALL_CONFIGS[family], seed=seed)
    return paths


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-work")


@pytest.fixture(scope="module")
def olmoe(ckpts) -> MoEEmbedder:
    return MoEEmbedder.from_pretrained(ckpts["olmoe"])


@pytest.fixture(scope="module")
def qwen(ckpts) -> MoEEmbedder:
    return MoEEmbedder.from_pretrained(ckpts["qwen2_moe"])


class Runs:
    """Named subprocess runs on a thread pool; runs[name] waits for one."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(WORKERS)
        self.futures = {}

    def add(self, name, *args, **kwargs) -> None:
        self.futures[name] = self.pool.submit(moee, *args, **kwargs)

    def add_sequence(self, name, *argvs) -> None:
        """Commands run one after the other (their order matters); runs[name] is the list of results."""
        self.futures[name] = self.pool.submit(lambda: [moee(*argv) for argv in argvs])

    def __getitem__(self, name):
        return self.futures[name].result()


JOBS = []  # (function that adds runs, names of the tests that read them), slowest first


def jobs_for(*tests):
    def register(function):
        JOBS.append((function, set(tests)))
        return function

    return register


@pytest.fixture(scope="module", autouse=True)
def runs(request, workdir):
    """Start, at the beginning of the module, the runs of every selected test, then hand them out."""
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    runs = Runs()
    for add_jobs, tests in JOBS:
        if selected & tests:
            add_jobs(runs, request, workdir)
    yield runs
    runs.pool.shutdown(cancel_futures=True)



# ----------------------------------------------------------------------------- jobs started first: the longest


@jobs_for("test_demo_builds_once_and_runs_every_step")
def demo_jobs(runs, request, workdir):
    runs.add_sequence("demo", ("demo", "--dir", workdir / "demo"), ("demo", "--dir", workdir / "demo"))


@jobs_for("test_eval_mteb_unknown_task")
def mteb_jobs(runs, request, workdir):
    if HAVE_MTEB:
        runs.add("mteb unknown task", "eval", "mteb", "--model", request.getfixturevalue("ckpts")["olmoe"], "--tasks", "NoSuchTask123")


@jobs_for("test_verify_passes", "test_verify_json")
def verify_jobs(runs, request, workdir):
    ckpts = request.getfixturevalue("ckpts")
    # The demo runs (and its test checks) the text report of all three families.
    runs.add("verify json", "verify", "--model", ckpts["olmoe"], "--json")
    runs.add("verify deepseek", "verify", "--model", ckpts["deepseek"])


# ----------------------------------------------------------------------------- --help

HELP = {
    "moee": ((), ["embed", "route", "eval", "verify", "info", "prompts", "demo", "serve", "--verbose"]),
    "embed": (("embed",), ["--model", "--dtype", "--input", "--field", "--output", "--format", "--kind", "--normalize",
                           "--allow-empty", "--mode", "--prompt", "--alpha", "--batch-size", "--max-length",
                           "--truncation", "--pooling", "--hs-layer", "--rw-values", "--rw-layers", "--standardizer",
                           "--no-progress"]),
    "route": (("route",), ["--model", "TEXT", "--prompt", "--all-tokens", "--top", "--max-length", "--json", "--png"]),
    "eval": (("eval",), ["sts", "mteb"]),
    "eval sts": (("eval", "sts"), ["--model", "--pairs", "--dev-pairs", "--format", "--json", "--alpha", "--prompt",
                                   "--batch-size", "--standardizer"]),
    "eval mteb": (("eval", "mteb"), ["--model", "--tasks", "--kind", "--output-dir", "--json", "--alpha", "--prompt"]),
    "verify": (("verify",), ["--model", "--json"]),
    "info": (("info",), ["--model", "--json"]),
    "prompts": (("prompts",), ["--json"]),
    "demo": (("demo",), ["--dir"]),
    "serve": (("serve",), ["--model", "--dtype", "--int8", "--memory-budget", "--host", "--port", "--api-key",
                           "--allow-unauthenticated", "--kind", "--prompt", "--max-batch-size", "--max-batch-tokens",
                           "--max-queue", "--max-body", "--max-inputs", "--max-input-tokens", "--truncate"]),
}


def check_help(name: str, code: int, out: str, err: str) -> None:
    argv, options = HELP[name]
    prog = " ".join(("moee",) + argv)
    assert (code, err) == (0, ""), err
    assert out.startswith(f"usage: {prog} "), out
    for option in options:
        assert re.search(rf"(^|[\s\[]){re.escape(option)}\b", out, re.M), f"{option} not in the help of {prog}"


@jobs_for("test_help_subprocess")
def help_jobs(runs, request, workdir):
    runs.add("help", "--help")


def test_help_subprocess(runs):
    result = runs["help"]
    check_help("moee", result.returncode, result.stdout, result.stderr)


@pytest.mark.parametrize("name", list(HELP))
def test_help(capsys, name):
    check_help(name, *in_process(capsys, *HELP[name][0], "--help"))


def test_verify_has_no_dtype_option(capsys):
    """verify always compares in float32; an accepted --dtype would be silently ignored."""
    code, out, _ = in_process(capsys, "verify", "--help")
    assert code == 0 and "--dtype" not in out


# ----------------------------------------------------------------------------- usage errors (exit 2)

# The parser's own list of commands (others may be added), as argparse quotes it.
COMMANDS = ", ".join(map(repr, next(a.choices for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))))
USAGE = {
    "unknown command": (
        ("frobnicate",),
        f"moee: error: argument COMMAND: invalid choice: 'frobnicate' (choose from {COMMANDS}) (see moee --help)",
    ),
    "missing model": (
        ("embed", "--input", "{texts}", "--output", "{out}"),
        "moee embed: error: the following arguments are required: --model (see moee embed --help)",
    ),
    "bad alpha": (
        ("{embed}", "--alpha", "-1"),
        "moee embed: error: argument --alpha: alpha must be a finite number >= 0, got '-1' (see moee embed --help)",
    ),
    "bad batch size": (
        ("{embed}", "--batch-size", "0"),
        "moee embed: error: argument --batch-size: expected a positive integer, got '0' (see moee embed --help)",
    ),
    "unknown kind": (
        ("{embed}", "--kind", "bogus"),
        "moee embed: error: argument --kind: invalid choice: 'bogus' (choose from 'hs', 'rw', 'moee-concat', 'moee-sum') "
        "(see moee embed --help)",
    ),
}
USAGE_IN_PROCESS = {
    "no command": ((), "moee: error: the following arguments are required: COMMAND (see moee --help)"),
    "no suite": (("eval",), "moee eval: error: the following arguments are required: SUITE (see moee eval --help)"),
    "alpha text": (
        ("{embed}", "--alpha", "lots"),
        "moee embed: error: argument --alpha: alpha must be a number >= 0 or 'auto', got 'lots' (see moee embed --help)",
    ),
    "alpha nan": (
        ("{embed}", "--alpha", "nan"),
        "moee embed: error: argument --alpha: alpha must be a finite number >= 0, got 'nan' (see moee embed --help)",
    ),
    "alpha inf": (
        ("{embed}", "--alpha", "inf"),
        "moee embed: error: argument --alpha: alpha must be a finite number >= 0, got 'inf' (see moee embed --help)",
    ),
    "batch size text": (
        ("{embed}", "--batch-size", "2.5"),
        "moee embed: error: argument --batch-size: expected a positive integer, got '2.5' (see moee embed --help)",
    ),
    "bad layers": (
        ("{embed}", "--rw-layers", "1,x"),
        "moee embed: error: argument --rw-layers: expected comma-separated layer indices like 1,2,5; got '1,x' "
        "(see moee embed --help)",
    ),
    "mteb alpha auto": (
        ("eval", "mteb", "--model", "{model}", "--tasks", "STS12", "--alpha", "auto"),
        "moee eval mteb: error: moee eval mteb takes a fixed --alpha (see moee eval mteb --help)",
    ),
    "official with ablations": (
        ("{embed}", "--mode", "official", "--pooling", "mean", "--max-length", "8"),
        "moee embed: error: --mode official reproduces the authors' code and takes no --pooling, --max-length "
        "(see moee embed --help)",
    ),
    "hs takes no alpha": (("{embed}", "--kind", "hs", "--alpha", "2"),
                          "moee embed: error: --alpha weighs RW against HS in moee-sum; --kind hs does not use it: drop --alpha "
                          "(see moee embed --help)"),
}


def usage_argv(argv, ckpts, workdir) -> list[str]:
    texts, out = workdir / "usage.txt", workdir / "usage-out.npy"
    if not texts.exists():  # (subprocesses may be reading it)
        texts.write_text("one\ntwo\n")
    embed = ["embed", "--model", str(ckpts["olmoe"]), "--input", str(texts), "--output", str(out)]
    filled = []
    for arg in argv:
        filled += embed if arg == "{embed}" else [arg.format(texts=texts, out=out, model=ckpts["olmoe"])]
    return filled


@jobs_for("test_usage_errors_exit_2_with_one_line")
def usage_jobs(runs, request, workdir):
    ckpts = request.getfixturevalue("ckpts")
    for case, (argv, _) in USAGE.items():
        runs.add(f"usage {case}", *usage_argv(argv, ckpts, workdir))


@pytest.mark.parametrize("case", list(USAGE))
def test_usage_errors_exit_2_with_one_line(runs, workdir, case):
    one_line_error(runs[f"usage {case}"], 2, USAGE[case][1])
    assert not (workdir / "usage-out.npy").exists()


@pytest.mark.parametrize("case", list(USAGE_IN_PROCESS))
def test_usage_errors_in_process(ckpts, workdir, capsys, case):
    argv, message = USAGE_IN_PROCESS[case]
    code, out, err = in_process(capsys, *usage_argv(argv, ckpts, workdir))
    assert (code, out, err.splitlines()) == (2, "", [message])
    assert not (workdir / "usage-out.npy").exists()


# ----------------------------------------------------------------------------- expected errors (exit 1)


def error_cases(w: Path, model: Path) -> dict[str, tuple[tuple, str]]:
    """argv and the one-line message of each expected error; w holds the files of error_files()."""
    texts, out = w / "texts.txt", w / "out.npy"
    sts = ("eval", "sts", "--model", model, "--pairs")
    return {
        "missing input": (
            ("embed", "--model", model, "--input", w / "nope.txt", "--output", out),
            f"moee embed: error: {w}/nope.txt: no such file",
        ),
        "no such model": (
            ("embed", "--model", w / "nowhere", "--input", texts, "--output", out),
            f"moee embed: error: {w}/nowhere: no such directory, and not a hub id of the form 'owner/name'",
        ),
        "not a checkpoint": (
            ("embed", "--model", w / "empty-dir", "--input", texts, "--output", out),
            f"moee embed: error: {w}/empty-dir/config.json: no config.json found; a checkpoint directory needs one",
        ),
        "bad score": (
            (*sts, w / "bad-score.tsv"),
            f"moee eval sts: error: {w}/bad-score.tsv, line 3: score 'four' is not a number",
        ),
        "unknown prompt": (
            ("embed", "--model", model, "--input", texts, "--output", out, "--prompt", "bogus"),
            "moee embed: error: unknown prompt 'bogus': it is not a built-in name and contains no {text} placeholder. "
            "Built-in names: none, prompteol, style, sentiment, tone, intent, complexity, subjectivity, language_style, "
            "grammar_structure. A custom template must contain {text} where the text goes, e.g. 'Summarise: \"{text}\"'.",
        ),
        # In process from here on (see IN_PROCESS_ERRORS).
        "missing column": (
            (*sts, w / "no-score-column.tsv"),
            f"moee eval sts: error: {w}/no-score-column.tsv, line 1: header lacks score; expected columns sentence1, sentence2, score",
        ),
        "field count": (
            (*sts, w / "short-row.tsv"),
            f"moee eval sts: error: {w}/short-row.tsv, line 3: 2 fields, the header has 3",
        ),
        "missing key": (
            (*sts, w / "missing-key.jsonl"),
            f"moee eval sts: error: {w}/missing-key.jsonl, line 3: sentence2 is missing or not text",
        ),
        "no weights": (
            ("route", "--model", w / "config-only", "text"),
            f"moee route: error: {w}/config-only: no model.safetensors or model.safetensors.index.json; the weights must be in safetensors format",
        ),
        "info on a file": (
            ("info", "--model", texts),
            f"moee info: error: {texts} is a file; pass the checkpoint directory that holds config.json",
        ),
    }


IN_PROCESS_ERRORS = ["missing column", "field count", "missing key", "no weights", "info on a file"]
SUBPROCESS_ERRORS = [case for case in error_cases(Path("w"), Path("m")) if case not in IN_PROCESS_ERRORS]


@pytest.fixture(scope="module")
def error_files(ckpts, workdir) -> Path:
    w = workdir / "errors"
    w.mkdir()
    (w / "texts.txt").write_text("one\ntwo\n")
    (w / "empty-dir").mkdir()
    (w / "config-only").mkdir()
    (w / "config-only" / "config.json").write_text((ckpts["olmoe"] / "config.json").read_text())
    header = "sentence1\tsentence2\tscore\n"
    (w / "bad-score.tsv").write_text(header + "a\tb\t1\nc\td\tfour\n")
    (w / "no-score-column.tsv").write_text("sentence1\tsentence2\na\tb\n")
    (w / "short-row.tsv").write_text(header + "a\tb\t1\nc\td\n")
    (w / "missing-key.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n\n{"sentence1": "c", "score": 2}\n')
    return w


@jobs_for("test_expected_errors_exit_1_with_one_line", "test_verbose_adds_the_traceback")
def error_jobs(runs, request, workdir):
    w, model = request.getfixturevalue("error_files"), request.getfixturevalue("ckpts")["olmoe"]
    cases = error_cases(w, model)
    for case in SUBPROCESS_ERRORS:
        runs.add(f"error {case}", *cases[case][0])
    runs.add("error verbose", "--verbose", *cases["unknown prompt"][0])


@pytest.mark.parametrize("case", SUBPROCESS_ERRORS)
def test_expected_errors_exit_1_with_one_line(runs, ckpts, error_files, case):
    one_line_error(runs[f"error {case}"], 1, error_cases(error_files, ckpts["olmoe"])[case][1])
    assert not (error_files / "out.npy").exists()


@pytest.mark.parametrize("case", IN_PROCESS_ERRORS)
def test_expected_errors_in_process(ckpts, error_files, capsys, case):
    argv, message = error_cases(error_files, ckpts["olmoe"])[case]
    code, out, err = in_process(capsys, *argv)
    assert (code, out, err.splitlines()) == (1, "", [message])


def test_embed_checks_the_output_before_embedding(ckpts, error_files, monkeypatch, capsys):
    def no_model(ns):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(cli, "load_embedder", no_model)
    w = error_files
    for output, message in [
        (["--output", w / "vectors.bin"], f"{w}/vectors.bin: cannot tell the output format from the name; pass --format npy, jsonl or parquet"),
        (["--output", w / "no-dir" / "out.npy"], f"{w}/no-dir: no such directory for the output"),
        (["--output", w / "empty-dir", "--format", "npy"], f"{w}/empty-dir is a directory; give a file name for the output"),
    ]:
        code, out, err = in_process(capsys, "embed", "--model", ckpts["olmoe"], "--input", w / "texts.txt", *output)
        assert (code, out, err.splitlines()) == (1, "", [f"moee embed: error: {message}"])


def test_verbose_adds_the_traceback(runs, ckpts, error_files):
    result = runs["error verbose"]
    assert result.returncode == 1, show(result)
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-2].startswith("moee_ref.errors.InputError: unknown prompt 'bogus'")
    assert lines[-1] == error_cases(error_files, ckpts["olmoe"])["unknown prompt"][1]
    assert result.stdout == ""


@pytest.mark.skipif(importlib.util.find_spec("moee_ref.evaluation.mteb") is None, reason="moee_ref/mteb_wrapper.py is not written yet")
@pytest.mark.skipif(importlib.util.find_spec("mteb") is None, reason="mteb (the optional mteb extra) is not installed")
def test_eval_mteb_unknown_task(runs):
    result = runs["mteb unknown task"]
    assert result.returncode == 1, show(result)
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, show(result)
    assert result.stderr.startswith("moee eval mteb: error: unknown MTEB task 'NoSuchTask123'"), show(result)


# ----------------------------------------------------------------------------- embed


@jobs_for(
    "test_embed_npy_matches_the_api", "test_embed_jsonl_output", "test_embed_stdin_with_progress_on_stderr",
    "test_embed_failure_keeps_the_existing_output", "test_embed_official_mode",
)
def embed_jobs(runs, request, workdir):
    model = request.getfixturevalue("ckpts")["olmoe"]
    d = workdir / "embed"
    d.mkdir()
    (d / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    (d / "gap.txt").write_text("first\n\nthird\n")
    (d / "keep.npy").write_bytes(b"previous results")
    base = ("embed", "--model", model)
    texts = ("--input", d / "texts.txt")
    runs.add("embed npy", *base, *texts, "--output", d / "out.npy", "--prompt", "prompteol")
    runs.add("embed jsonl", *base, *texts, "--output", d / "out.jsonl", "--kind", "hs")
    runs.add("embed stdin", *base, "--input", "-", "--output", d / "stdin.npy", "--kind", "moee-concat",
             "--batch-size", "64", stdin="\n".join(MANY) + "\n")
    runs.add("embed gap", *base, "--input", d / "gap.txt", "--output", d / "keep.npy")
    runs.add("embed official", *base, *texts, "--output", d / "official.npy", "--mode", "official", "--prompt",
             "prompteol", "--alpha", "2", "--instruction", "Find the topic")


def test_embed_npy_matches_the_api(runs, workdir, olmoe):
    d = workdir / "embed"
    result = ok(runs["embed npy"])
    assert result.stdout == ""
    assert summary_lines(result.stderr) == [f"embedded 5 texts as moee-sum (128 dims, alpha 1) in {AUTO} -> {d / 'out.npy'}"]
    vectors = load_npy(d / "out.npy")
    assert vectors.dtype == np.float32 and vectors.shape == (5, 128)
    np.testing.assert_allclose(vectors, olmoe.encode(TEXTS, prompt="prompteol"), rtol=0, atol=1e-6)
    # --prompt reached the model: without it the vectors differ.
    assert np.abs(vectors - olmoe.encode(TEXTS)).max() > 1e-2
    assert stat.S_IMODE((d / "out.npy").stat().st_mode) == default_mode()


def test_embed_jsonl_output(runs, workdir, olmoe):
    d = workdir / "embed"
    result = ok(runs["embed jsonl"])
    assert summary_lines(result.stderr) == [f"embedded 5 texts as hs (64 dims) in {AUTO} -> {d / 'out.jsonl'}"]
    records = [json.loads(line) for line in (d / "out.jsonl").read_text().splitlines()]
    assert records[0]["moee_ref.provenance"]["spec"]["kind"] == "hs"
    records = records[1:]
    assert [set(r) for r in records] == [{"row", "embedding", "text"}] * 5
    assert [r["row"] for r in records] == list(range(5))
    assert [r["text"] for r in records] == TEXTS
    np.testing.assert_allclose(np.array([r["embedding"] for r in records]), olmoe.encode(TEXTS, kind="hs"), rtol=0, atol=1e-6)


def test_embed_stdin_with_progress_on_stderr(runs, workdir, olmoe):
    d = workdir / "embed"
    result = ok(runs["embed stdin"])
    assert result.stdout == ""
    assert re.search(r"embedding: 100%.* 5/5 ", result.stderr), result.stderr  # 300 texts: a progress bar
    assert summary_lines(result.stderr)[-1] == f"embedded 300 texts as moee-concat (128 dims) in {AUTO} -> {d / 'stdin.npy'}"
    expected = olmoe.encode(MANY, kind="moee-concat", batch_size=64)
    np.testing.assert_allclose(load_npy(d / "stdin.npy"), expected, rtol=0, atol=1e-6)


def test_embed_failure_keeps_the_existing_output(runs, workdir):
    d = workdir / "embed"
    one_line_error(
        runs["embed gap"], 1,
        f"moee embed: error: {d / 'gap.txt'}, line 2: the text is empty or whitespace only; remove it, or pass allow_empty=True "
        "(--allow-empty on the command line) to embed the prompt around an empty text",
    )
    assert (d / "keep.npy").read_bytes() == b"previous results"
    # (Other runs write beside it at the same time; the failed one's temporary file would be .keep.npy.*.partial.)
    assert [p.name for p in d.iterdir() if p.name.startswith(".keep.npy.")] == []


def test_embed_official_mode(runs, workdir, olmoe):
    d = workdir / "embed"
    result = ok(runs["embed official"])
    assert summary_lines(result.stderr) == [f"embedded 5 texts as moee-sum (128 dims, alpha 2) in {AUTO}, the authors' pipeline "
                                          f"in batches of 64 -> {d / 'official.npy'}"]
    official = load_npy(d / "official.npy")
    expected = encode_official(olmoe, TEXTS, prompt="prompteol", alpha=2.0, instruction="Find the topic")
    np.testing.assert_allclose(official, expected, rtol=0, atol=1e-6)
    assert np.abs(official - encode_official(olmoe, TEXTS, prompt="prompteol", alpha=2.0)).max() > 1e-2
    assert np.abs(official - olmoe.encode(TEXTS, prompt="prompteol", alpha=2.0)).max() > 1e-2


def test_embed_jsonl_input_field_and_format_in_process(ckpts, tmp_path, olmoe, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "body": t, "text": "not this field"}) + "\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "field.vec"
    code, stdout, stderr = in_process(
        capsys, "embed", "--model", ckpts["olmoe"], "--input", docs, "--field", "body", "--output", out, "--format", "npy", "--kind", "rw",
    )
    assert (code, stdout, summary_lines(stderr)) == (0, "", [f"embedded 5 texts as rw (64 dims) in {AUTO} -> {out}"])
    np.testing.assert_allclose(load_npy(out), olmoe.encode(TEXTS, kind="rw"), rtol=0, atol=1e-6)


def test_embed_allow_empty_no_progress_and_normalize_in_process(ckpts, tmp_path, olmoe, capsys):
    texts = ["first", "", *MANY]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "out.npy"
    code, stdout, stderr = in_process(
        capsys, "embed", "--model", ckpts["olmoe"], "--input", tmp_path / "texts.txt", "--output", out,
        "--allow-empty", "--no-progress", "--normalize", "--kind", "rw", "--prompt", "prompteol", "--batch-size", "64",
    )
    assert (code, stdout) == (0, "")
    assert summary_lines(stderr) == [f"embedded 302 texts as rw (64 dims) in {AUTO} -> {out}"]  # and no progress bar
    vectors = load_npy(out)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    expected = olmoe.encode(texts, kind="rw", prompt="prompteol", allow_empty=True, normalize=True, batch_size=64)
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-6)


def test_write_embeddings_failing_midway_keeps_the_old_file(tmp_path):
    """In process: the atomic writer itself, when the vectors give out halfway through a JSONL file."""
    from moee_ref.io.outputs import write_embeddings

    def vectors():
        yield np.ones(3, np.float32)
        raise RuntimeError("out of memory, say")

    final = tmp_path / "emb.jsonl"
    final.write_text("old\n")
    with pytest.raises(RuntimeError, match="out of memory, say"):
        write_embeddings(final, vectors(), "jsonl")
    assert final.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["emb.jsonl"]


# ----------------------------------------------------------------------------- route


@jobs_for("test_route_table_lists_every_moe_layer", "test_route_json_weights_match_the_model", "test_route_png_without_matplotlib")
def route_jobs(runs, request, workdir):
    ckpts = request.getfixturevalue("ckpts")
    d = workdir / "route"
    fake = d / "no-matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("matplotlib is hidden for this test")\n')
    hidden = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}
    runs.add("route table", "route", "--model", ckpts["deepseek"], *ROUTE_TEXTS)
    runs.add("route json", "route", "--model", ckpts["olmoe"], "--dtype", "float32", "--json", "--png", d / "heat.png", *ROUTE_TEXTS)
    runs.add("route no matplotlib", "route", "--model", ckpts["olmoe"], "--png", d / "never.png", ROUTE_TEXTS[1], env=hidden)


def check_routing(token: dict, out, position: int, top: int) -> None:
    """One token's JSON routing entry against the decoder's own top-k at that position."""
    assert [layer["layer"] for layer in token["layers"]] == list(out.moe_layers)
    for i, layer in enumerate(token["layers"]):
        weights = out.topk_weights[0, i, position]
        order = torch.argsort(weights, descending=True)[:top]
        assert layer["experts"] == out.topk_ids[0, i, position][order].tolist()
        np.testing.assert_allclose(layer["weights"], weights[order].numpy(), rtol=0, atol=2e-6)


def test_route_table_lists_every_moe_layer(runs):
    blocks = ok(runs["route table"]).stdout.strip("\n").split("\n\n")
    assert [block.splitlines()[0] for block in blocks] == [repr(t) for t in ROUTE_TEXTS]
    for block in blocks:
        lines = block.splitlines()
        assert lines[1].startswith("-- token ")
        assert lines[2] == "layer  entropy  top experts (mixing weight)"
        # DeepSeekMoE: layer 0 is dense, layers 1-3 are MoE with the top 3 experts each.
        assert [int(line.split()[0]) for line in lines[3:]] == [1, 2, 3]
        assert [len(line.split()) for line in lines[3:]] == [2 + 3] * 3


def test_route_json_weights_match_the_model(runs, ckpts, workdir):
    d = workdir / "route"
    result = ok(runs["route json"])
    report = json.loads(result.stdout)
    assert report["moe_layers"] == [0, 1, 2, 3]
    assert [t["text"] for t in report["texts"]] == ROUTE_TEXTS
    for entry in report["texts"]:
        ids, out = routing_alone(ckpts["olmoe"], entry["text"])
        (token,) = entry["tokens"]
        assert (token["token_id"], token["position"]) == (ids[-1], len(ids) - 1)
        assert [len(layer["experts"]) for layer in token["layers"]] == [4] * 4  # top-k of the olmoe config
        check_routing(token, out, len(ids) - 1, top=4)
    assert result.stderr.splitlines() == [f"wrote {d / 'heat.png'}"]
    assert (d / "heat.png").read_bytes()[:8] == PNG_SIGNATURE
    assert stat.S_IMODE((d / "heat.png").stat().st_mode) == default_mode()


def test_route_all_tokens_and_top_in_process(ckpts, capsys):
    code, out, err = in_process(
        capsys, "route", "--model", ckpts["qwen2_moe"], "--dtype", "float32", "--json", "--all-tokens", "--top", "2", "--prompt", "prompteol", ROUTE_TEXTS[1],
    )
    assert (code, err) == (0, "")
    (entry,) = json.loads(out)["texts"]
    ids, decoded = routing_alone(ckpts["qwen2_moe"], BUILTIN_PROMPTS["prompteol"].replace("{text}", ROUTE_TEXTS[1]))
    assert [t["position"] for t in entry["tokens"]] == list(range(len(ids)))
    assert [t["token_id"] for t in entry["tokens"]] == ids
    for position, token in enumerate(entry["tokens"]):
        assert [len(layer["experts"]) for layer in token["layers"]] == [2] * 4
        check_routing(token, decoded, position, top=2)


def test_route_png_without_matplotlib(runs, workdir):
    d = workdir / "route"
    result = runs["route no matplotlib"]
    # Found before the model is loaded, not after the table is printed.
    one_line_error(result, 1, "moee route: error: --png needs matplotlib, the optional plot extra: pip install matplotlib (in a clone of moee-ref: pip install -e '.[plot]')")
    assert [p.name for p in d.iterdir() if p.name.startswith(("never.png", ".never.png"))] == []  # nor a temporary file


# ----------------------------------------------------------------------------- eval sts


@pytest.fixture(scope="module")
def sts_files(workdir) -> Path:
    d = workdir / "sts"
    d.mkdir()
    (d / "pairs.tsv").write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in PAIRS))
    (d / "pairs.csv").write_text("score,sentence1,sentence2\n" + "".join(f"{s},{csv_field(a)},{csv_field(b)}\n" for a, b, s in PAIRS))
    (d / "pairs.jsonl").write_text(jsonl_pairs(PAIRS))
    (d / "dev.jsonl").write_text(jsonl_pairs(DEV_PAIRS))
    (d / "pairs.data").write_text((d / "pairs.csv").read_text())
    return d


@jobs_for("test_eval_sts_table_is_the_same_for_every_format", "test_eval_sts_json_rows_are_spearman_of_cosines")
def sts_jobs(runs, request, workdir):
    d, model = request.getfixturevalue("sts_files"), request.getfixturevalue("ckpts")["qwen2_moe"]
    runs.add("sts tsv", "eval", "sts", "--model", model, "--pairs", d / "pairs.tsv")
    runs.add("sts json", "eval", "sts", "--model", model, "--pairs", d / "pairs.jsonl", "--dev-pairs", d / "dev.jsonl",
             "--alpha", "0.5", "--json")


def test_eval_sts_table_is_the_same_for_every_format(runs, ckpts, sts_files, capsys):
    result = ok(runs["sts tsv"])
    assert result.stderr == ""
    table = result.stdout
    lines = table.splitlines()
    assert lines[0].split() == ["embedding", "alpha", "spearman", "pearson"]
    assert [line.split()[0] for line in lines[1:-1]] == ["hs", "rw", "moee-concat", "moee-sum", "moee-sum"]
    assert lines[4].split()[1:3] == ["1", "(fixed)"] and lines[5].split()[2] == "(auto)"
    assert lines[-1] == f"{len(PAIRS)} pairs"
    # The same pairs as CSV (columns reordered, quoted fields) and JSONL, and a CSV under another name with --format.
    for extra in (["pairs.csv"], ["pairs.jsonl"], ["pairs.data", "--format", "csv"]):
        code, out, err = in_process(capsys, "eval", "sts", "--model", ckpts["qwen2_moe"], "--pairs", sts_files / extra[0], *extra[1:])
        assert (code, out, err) == (0, table, ""), extra


def test_eval_sts_json_rows_are_spearman_of_cosines(runs, qwen):
    result = json.loads(ok(runs["sts json"]).stdout)
    assert (result["pairs"], result["truncated"], result["prompt"]) == (len(PAIRS), 0, "none")
    rows = result["rows"]
    assert [(r["embedding"], r["alpha_rule"]) for r in rows] == [
        ("hs", None), ("rw", None), ("moee-concat", None),
        ("moee-sum", "fixed"), ("moee-sum", "auto"), ("moee-sum", "supervised"),
    ]
    assert rows[3]["alpha"] == 0.5
    first, second, gold = ([p[i] for p in PAIRS] for i in range(3))
    unique = list(dict.fromkeys(first + second))
    feats = qwen.features(unique)
    a = [unique.index(t) for t in first]
    b = [unique.index(t) for t in second]
    sim_hs, sim_rw = cosines(feats.hs[a], feats.hs[b]), cosines(feats.rw[a], feats.rw[b])
    concat = np.concatenate([feats.hs, feats.rw], axis=1)
    sims = [sim_hs, sim_rw, cosines(concat[a], concat[b])] + [sim_hs + row["alpha"] * sim_rw for row in rows[3:]]
    for row, sim in zip(rows, sims):
        assert abs(row["spearman"] - spearman(sim, gold)) <= 1e-9, row
        assert abs(row["pearson"] - pearson(sim, gold)) <= 1e-6, row
    # The table prints the same numbers, rounded (its fixed row has alpha 1, this one 0.5).
    table = ok(runs["sts tsv"]).stdout.splitlines()
    for line, row in zip(table[1:6], rows):
        if row["alpha_rule"] != "fixed":
            assert line.split()[-2:] == [f"{row['spearman']:.4f}", f"{row['pearson']:.4f}"]


def test_eval_sts_official_mode_is_the_authors_evaluation(ckpts, sts_files, qwen, capsys):
    from moee_ref.io.inputs import read_pairs
    from moee_ref.evaluation.sts import evaluate_sts_official
    from moee_ref.embedding.official_tasks import STS

    base = ("eval", "sts", "--model", ckpts["qwen2_moe"], "--pairs", sts_files / "pairs.tsv")
    code, out, err = in_process(capsys, *base, "--mode", "official", "--prompt", "prompteol", "--instruction", "e5",
                                "--alpha", "0.5", "--batch-size", "4", "--json")
    assert (code, err) == (0, "")
    result = json.loads(out)
    expected = evaluate_sts_official(qwen, read_pairs(sts_files / "pairs.tsv"), prompt="prompteol", instruction=STS,
                                     alpha=0.5, batch_size=4)
    assert (result["mode"], result["batch_size"], result["instruction"], result["ensemble"]) == ("official", 4, STS, "standardized")
    assert [r["embedding"] for r in result["rows"]] == ["hs", "rw", "moee-concat", "moee-sum"]
    for got, want in zip(result["rows"], expected["rows"]):
        assert got["spearman"] == pytest.approx(want["spearman"], abs=1e-9), got
    code, out, _ = in_process(capsys, *base, "--mode", "official")
    assert code == 0 and out.splitlines()[-1] == (f"{len(PAIRS)} pairs; the authors' pipeline: batches of 64, no instruction, "
                                                  "moee-sum of standardized HS and RW")
    code, _, err = in_process(capsys, *base, "--mode", "official", "--dev-pairs", sts_files / "dev.jsonl")
    assert code == 2 and "--mode official reproduces the authors' code and takes no --dev-pairs" in err
    code, _, err = in_process(capsys, *base, "--ensemble", "unstandardized", "--instruction", "x")
    assert code == 2 and "--instruction and --ensemble are options of --mode official" in err


# ----------------------------------------------------------------------------- verify


def test_verify_passes(runs):
    lines = ok(runs["verify deepseek"]).stdout.splitlines()
    assert re.fullmatch(r"deepseek: \d+ real tokens compared, float32", lines[0]), lines
    assert len(lines) == 7 and all(line.endswith(" ok") for line in lines[2:6]), lines
    assert lines[-1] == "PASS"


def test_verify_json(runs):
    report = json.loads(ok(runs["verify json"]).stdout)
    assert report["passed"] is True and report["family"] == "olmoe"
    assert report["topk_agreement"] == 1.0 and report["topk_real_mismatches"] == 0
    assert report["logits_rel"] <= report["tolerances"]["logits_rel"]
    assert report["router_probs_abs"] <= report["tolerances"]["router_probs_abs"]


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="moee verify needs transformers")
def test_verify_mismatch_exits_3(ckpts, monkeypatch, capsys):
    """In process. No real checkpoint was found on which moee-ref and transformers disagree
    (moee-ref refuses the config fields it does not read as transformers does), so transformers'
    model is loaded for real and one router matrix of it is then negated, as a wrong
    implementation would compute; verify() and the exit code are the real ones."""
    from moee_ref.evaluation import verify

    real_load_reference = verify.load_reference

    def disagreeing_reference(directory, args):
        reference = real_load_reference(directory, args)
        with torch.no_grad():
            reference.model.layers[1].mlp.gate.weight.mul_(-1.0)
        return reference

    monkeypatch.setattr(verify, "load_reference", disagreeing_reference)
    code, out, err = in_process(capsys, "verify", "--model", ckpts["olmoe"])
    assert (code, err) == (3, "")
    assert out.splitlines()[-1] == "FAIL: moee-ref and transformers disagree beyond tolerance"
    assert re.search(r"^router probs, max abs\. error .* MISMATCH$", out, re.M), out
    code, out, _ = in_process(capsys, "verify", "--model", ckpts["olmoe"], "--json")
    report = json.loads(out)
    assert code == 3 and report["passed"] is False
    assert report["router_probs_abs"] > report["tolerances"]["router_probs_abs"]


# ----------------------------------------------------------------------------- info and prompts


@jobs_for("test_info_text", "test_info_json_counts_every_parameter", "test_info_on_a_bare_config_file", "test_prompts")
def info_jobs(runs, request, workdir):
    ckpts = request.getfixturevalue("ckpts")
    runs.add("info text", "info", "--model", ckpts["deepseek"])
    runs.add("info json", "info", "--model", ckpts["qwen2_moe"], "--json")
    runs.add("info bare config", "info", "--model", FIXTURES / "configs" / "deepseek.json", "--json")
    runs.add("prompts json", "prompts", "--json")


def test_info_text(runs):
    lines = ok(runs["info text"]).stdout.splitlines()
    assert lines[:4] == [
        "family              deepseek",
        "layers              4 (3 MoE: 1-3; dense: 0)",
        "routed experts      16 of size 32, top-3",
        "shared experts      one MLP of 64, ungated",  # two shared experts of 32, fused
    ]
    assert "embedding dims      HS 64, RW 48 (3 MoE layers x 16 experts)" in lines
    assert lines[-1].startswith("tokenizer           vocab 512, bos 1 (added)")


def test_info_json_counts_every_parameter(runs, ckpts):
    facts = json.loads(ok(runs["info json"]).stdout)
    assert facts["parameters_total"] == read_config(ckpts["qwen2_moe"]).parameter_counts()[0]
    assert facts["parameters_total"] == sum(p.numel() for p in load_model(ckpts["qwen2_moe"]).parameters())
    assert (facts["family"], facts["moe_layers"], facts["hs_dim"], facts["rw_dim"]) == ("qwen2_moe", [0, 1, 2, 3], 64, 4 * 15)
    assert facts["memory_fp32_bytes"] == 4 * facts["parameters_total"]
    assert facts["tokenizer"]["vocab_size"] == 512
    assert facts["source"] == str(ckpts["qwen2_moe"])


def test_info_on_a_bare_config_file(runs, capsys):
    config = FIXTURES / "configs" / "deepseek.json"
    facts = json.loads(ok(runs["info bare config"]).stdout)
    assert facts["parameters_total"] == read_config(config).parameter_counts()[0]
    assert (facts["layers"], facts["dense_layers"], facts["rw_dim"]) == (28, [0], 27 * 64)
    assert "tokenizer" not in facts
    code, out, _ = in_process(capsys, "info", "--model", config)
    assert code == 0 and "layers              28 (27 MoE: 1-27; dense: 0)" in out and "tokenizer" not in out


def test_prompts(runs, capsys):
    listed = json.loads(ok(runs["prompts json"]).stdout)
    assert listed == [{"name": n, "template": t} for n, t in BUILTIN_PROMPTS.items()] and len(listed) == 10
    code, out, _ = in_process(capsys, "prompts")
    lines = out.splitlines()
    assert code == 0 and [line.split()[0] for line in lines] == list(BUILTIN_PROMPTS)
    assert all(line.endswith("  " + BUILTIN_PROMPTS[line.split()[0]]) for line in lines)


# ----------------------------------------------------------------------------- demo (started first, checked last)


def test_demo_builds_once_and_runs_every_step(runs, workdir):
    first, second = runs["demo"]
    ok(first)
    root = workdir / "demo"
    assert f"The {len(SMALL_CONFIGS)} checkpoints below (one per family) are RANDOM" in first.stdout
    assert [line for line in first.stderr.splitlines() if line.startswith("building")] == [
        f"building random {family} checkpoint in {root / f'tiny-{family}'}" for family in SMALL_CONFIGS
    ]
    steps = [line for line in first.stdout.splitlines() if line.startswith("$ moee ")]
    verify_steps = ["verify"] * len(SMALL_CONFIGS) if HAVE_TRANSFORMERS else []
    assert [step.split()[2] for step in steps] == ["info"] * len(SMALL_CONFIGS) + ["prompts", "route", "embed", "eval"] + verify_steps
    # Each family's `moee verify` text report, as the demo prints it, ends in PASS.
    for family in SMALL_CONFIGS if HAVE_TRANSFORMERS else []:
        report = first.stdout.split(f"$ moee verify --model {root / f'tiny-{family}'}\n")[1].split("\n\n")[0].splitlines()
        assert re.fullmatch(rf"{family}: \d+ real tokens compared, float32", report[0]) and report[-1] == "PASS", report
    assert "\nDone. The checkpoints stay in" in first.stdout
    assert load_npy(root / "embeddings.npy").shape == (8, 128)

    ok(second)
    assert "building" not in second.stderr
    assert [line for line in second.stdout.splitlines() if line.startswith("$ moee ")] == steps


def test_whole_prompts_switches_off_the_shared_opening(ckpts, tmp_path, monkeypatch, capsys):
    """--whole-prompts reaches the embedder; both ways give the same vectors within float32 rounding."""
    seen, real = [], cli.load_embedder

    def spy(ns):
        embedder = real(ns)
        seen.append(embedder.share_prefix)
        return embedder

    monkeypatch.setattr(cli, "load_embedder", spy)
    texts = tmp_path / "texts.txt"
    texts.write_text("A cat sleeps on the warm windowsill.\nRain tomorrow.\nThe museum opens at nine.\n")
    vectors = []
    for flag in ([], ["--whole-prompts"]):
        out = tmp_path / f"vectors-{len(vectors)}.npy"
        code, _, err = in_process(capsys, "embed", "--model", ckpts["olmoe"], "--input", texts, "--output", out,
                                  "--prompt", "prompteol", "--kind", "moee-concat", "--dtype", "float32", *flag)
        assert code == 0, err
        vectors.append(np.load(out))
    assert seen == [True, False]
    assert np.abs(vectors[1] - vectors[0]).max() <= 1e-5 * np.abs(vectors[0]).max()
