"""`moee embed` with --memory-budget (layer-streamed) and --int8, run as subprocesses."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
import pytest

from moee_ref import MoEEmbedder
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint

TEXTS = ["A man plays a guitar.", "The market fell sharply today.", "Cats sleep.", "Rain is expected tomorrow in the north."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-memory")
    checkpoint = write_random_checkpoint(root / "deepseek", SMALL_CONFIGS["deepseek"], dtype="bfloat16", seed=5)
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return root, checkpoint


def moee(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moee_ref.cli.main", *map(str, argv)], capture_output=True, text=True, timeout=300)


def test_streamed_and_int8_embed_match_the_api(setup):
    root, checkpoint = setup
    common = ["embed", "--model", checkpoint, "--input", root / "texts.txt", "--kind", "moee-sum", "--prompt", "prompteol", "--batch-size", "2", "--dtype", "float32"]
    streamed = moee(*common, "--output", root / "streamed.npy", "--memory-budget", "2GB", "--spill-dir", root)
    assert streamed.returncode == 0, streamed.stderr
    resident = MoEEmbedder.from_pretrained(checkpoint, dtype=torch.float32).encode(TEXTS, "moee-sum", prompt="prompteol", batch_size=2)
    got = np.load(root / "streamed.npy", allow_pickle=False)
    assert np.abs(got - resident).max() <= 1e-5 * np.abs(resident).max()
    assert [p.name for p in root.iterdir() if p.name.startswith("moee-spill-")] == []  # nothing left behind

    quantized = moee(*common, "--output", root / "int8.npy", "--int8")
    assert quantized.returncode == 0, quantized.stderr
    expected = MoEEmbedder.from_pretrained(checkpoint, dtype=torch.float32, int8=True).encode(TEXTS, "moee-sum", prompt="prompteol", batch_size=2)
    assert np.abs(np.load(root / "int8.npy", allow_pickle=False) - expected).max() <= 1e-5 * np.abs(expected).max()


def test_budget_too_small_is_one_line_with_the_smallest_that_works(setup):
    root, checkpoint = setup
    result = moee("embed", "--model", checkpoint, "--input", root / "texts.txt", "--output", root / "x.npy", "--memory-budget", "1MB")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the smallest budget that works is" in lines[0] and "Traceback" not in result.stderr
    assert not (root / "x.npy").exists()


def test_unknown_prompt_is_reported_before_loading(setup):
    root, _ = setup
    result = moee("embed", "--model", root / "no-such-model", "--input", root / "texts.txt", "--output", root / "y.npy", "--prompt", "nonsense")
    assert result.returncode == 1
    assert "prompt 'nonsense'" in result.stderr or "nonsense" in result.stderr
    assert "no such directory" not in result.stderr  # the prompt was checked first
