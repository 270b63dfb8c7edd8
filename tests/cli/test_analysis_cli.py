"""`moee analyze prompts|complementarity|errors` run as subprocesses on a small random checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from moee_ref.evaluation.analysis import ANALYSIS_EXTRA_MESSAGE, complementarity, error_analysis_for_pairs, prompt_robustness
from moee_ref.io.inputs import read_pairs
from moee_ref.embedding.embedder import FeatureOptions, MoEEmbedder
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint

# Imported as moee_ref.cli.main (not run as __main__), as the `moee` script does.
RUNNER = "import sys; from moee_ref.cli.main import main; sys.exit(main(sys.argv[1:]))"
RUNNER_WITHOUT_SKLEARN = "import sys; sys.modules['sklearn'] = None; " + RUNNER

PAIRS = [
    ("A man is playing a guitar.", "Someone plays music on a guitar.", 4.2),
    ("The stock market fell sharply.", "Shares dropped steeply.", 4.5),
    ("A cat is sleeping on the sofa.", "A kitten naps on the couch.", 4.0),
    ("The weather is cold and rainy.", "It is a warm and sunny day.", 1.0),
    ("A woman is slicing an onion.", "A woman is cutting an onion.", 4.8),
    ("A dog runs in the park.", "The committee approved the budget.", 0.0),
    ("The train was late again.", "The meeting starts at noon.", 0.4),
    ("She is reading a book.", "A woman reads a novel.", 3.9),
]
TEXTS = [text for pair in PAIRS for text in pair[:2]]


def moee(*args, runner=RUNNER) -> subprocess.CompletedProcess:
    # One thread: on models this small more threads only contend, badly so on a busy machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", runner, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module", autouse=True)
def analyze_help():
    proc = moee("analyze", "--help")
    if proc.returncode != 0:
        pytest.skip("analyze not wired into cli.py yet")
    return proc.stdout


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze-cli")
    model = write_random_checkpoint(root / "olmoe", SMALL_CONFIGS["olmoe"], seed=9)
    pairs = root / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in PAIRS), encoding="utf-8")
    unscored = root / "unscored.tsv"
    unscored.write_text("sentence1\tsentence2\n" + "".join(f"{a}\t{b}\n" for a, b, _ in PAIRS), encoding="utf-8")
    texts = root / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return {"model": model, "pairs": pairs, "unscored": unscored, "texts": texts, "root": root}


@pytest.fixture(scope="module")
def embedder(files):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield MoEEmbedder.from_pretrained(files["model"])
    torch.set_num_threads(threads)


def assert_matches(printed, expected, path="result"):
    """The printed JSON equals the function's result: floats within 1e-5, NaN printed as null."""
    if isinstance(expected, float):
        if math.isnan(expected):
            assert printed is None, path
        else:
            assert printed == pytest.approx(expected, abs=1e-5), path
    elif isinstance(expected, dict):
        assert set(printed) == set(expected), path
        for key in expected:
            assert_matches(printed[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(printed) == len(expected), path
        for i, (p, e) in enumerate(zip(printed, expected)):
            assert_matches(p, e, f"{path}[{i}]")
    else:
        assert printed == expected, path


def one_line_error(proc, code: int) -> str:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""
    return lines[0]


# --------------------------------------------------------------------------- prompts


def test_help_lists_the_analyses(analyze_help):
    for name in ("prompts", "complementarity", "errors"):
        assert name in analyze_help


def test_prompts_text(files):
    proc = moee("analyze", "prompts", "--model", files["model"], "--pairs", files["pairs"], "--prompts", "none,prompteol")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "prompts: 1 none, 2 prompteol" in out
    assert "HS1" in out and "RW2" in out and "block means (off-diagonal): HS-HS" in out
    assert "Spearman against gold per prompt" in out and "variance" in out


def test_prompts_json_all_ten_prompts_and_png(files, embedder):
    pytest.importorskip("matplotlib", reason="--png needs the plot extra")
    png = files["root"] / "out" / "prompts.png"
    proc = moee("analyze", "prompts", "--model", files["model"], "--pairs", files["pairs"], "--json", "--png", png, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed.pop("model") == str(files["model"])
    assert len(printed["prompts"]) == 10
    expected = prompt_robustness(embedder, read_pairs(str(files["pairs"])))
    assert_matches(printed, expected)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prompts_without_scores(files, embedder):
    proc = moee("analyze", "prompts", "--model", files["model"], "--pairs", files["unscored"], "--prompts", "none,tone", "--json")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["gold"] is None
    expected = prompt_robustness(embedder, read_pairs(str(files["unscored"]), require_scores=False), ["none", "tone"])
    assert_matches({k: v for k, v in printed.items() if k != "model"}, expected)


def test_prompts_usage_errors(files):
    line = one_line_error(moee("analyze", "prompts", "--model", files["model"], "--pairs", files["pairs"], "--prompts", "none,nope"), 2)
    assert "unknown prompt 'nope'" in line and line.startswith("moee analyze prompts: error:")
    line = one_line_error(moee("analyze", "prompts", "--model", files["model"], "--pairs", files["pairs"], "--prompts", "none,None"), 2)
    assert "given twice" in line


# --------------------------------------------------------------------------- complementarity


def test_complementarity_text_and_json(files, embedder):
    pytest.importorskip("sklearn", reason="needs the analysis extra")
    args = ["analyze", "complementarity", "--model", files["model"], "--input", files["texts"], "--clusters", 3, "--sample-pairs", 50]
    proc = moee(*args)
    assert proc.returncode == 0, proc.stderr
    for text in ("k-means, k=3", "AMI", "NMI", "pair Jaccard", "exact matching", "over 50 pairs (sampled from 120, seed 0)"):
        assert text in proc.stdout
    proc = moee(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    expected = complementarity(embedder, TEXTS, 3, 0, 50)
    assert_matches({k: v for k, v in printed.items() if k != "model"}, expected)


def test_complementarity_errors(files):
    line = one_line_error(moee("analyze", "complementarity", "--model", files["model"], "--input", files["texts"], "--clusters", 0), 2)
    assert "--clusters" in line and "integer >= 2" in line
    pytest.importorskip("sklearn", reason="needs the analysis extra")
    line = one_line_error(moee("analyze", "complementarity", "--model", files["model"], "--input", files["texts"], "--clusters", 40), 1)
    assert line == "moee analyze complementarity: error: cannot make 40 clusters of 16 texts; lower the number of clusters"


def test_complementarity_without_scikit_learn(files):
    proc = moee("analyze", "complementarity", "--model", files["model"], "--input", files["texts"], "--clusters", 2, runner=RUNNER_WITHOUT_SKLEARN)
    assert one_line_error(proc, 1).endswith(ANALYSIS_EXTRA_MESSAGE)


# --------------------------------------------------------------------------- errors


def test_errors_text_and_json(files, embedder):
    args = ["analyze", "errors", "--model", files["model"], "--pairs", files["pairs"], "--threshold", 0.25, "--show", 2, "--prompt", "prompteol"]
    proc = moee(*args)
    assert proc.returncode == 0, proc.stderr
    for text in ("> 0.25", "pairs where at least one fails", "HS succeeds, RW fails", "HS fails, RW succeeds", "both fail", "both succeed"):
        assert text in proc.stdout
    proc = moee(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    expected = error_analysis_for_pairs(embedder, read_pairs(str(files["pairs"])), 0.25, 2, options=FeatureOptions(prompt="prompteol"))
    assert_matches({k: v for k, v in printed.items() if k != "model"}, expected)
    if printed["failing_pairs"]:
        assert sum(printed["shares"].values()) == pytest.approx(1.0)


def test_errors_errors(files):
    missing = files["root"] / "no-such.tsv"
    line = one_line_error(moee("analyze", "errors", "--model", files["model"], "--pairs", missing), 1)
    assert line == f"moee analyze errors: error: {missing}: no such file"
    line = one_line_error(moee("analyze", "errors", "--model", files["model"], "--pairs", files["unscored"]), 1)
    assert "score" in line
    line = one_line_error(moee("analyze", "errors", "--model", files["model"], "--pairs", files["pairs"], "--threshold", 2), 2)
    assert "--threshold" in line
