"""Memory-aware loading: a mode that does not fit is refused (API) or replaced (CLI) before any weight is read.

The memory a process may use is set with memory_limit= / --memory-limit, so that the
tests do not depend on the machine; the limits are placed between the needs the
estimate gives, taken from the same functions the loader uses.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moee_ref import MoEEmbedder, load_model
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint
from moee_ref.families import name_map_groups, read_config
from moee_ref.loading import checkpoint
from moee_ref.loading.checkpoint import ShardReader, choose_mode, shard_files
from moee_ref.loading.memory import (
    InsufficientMemoryError, _cgroup_room, format_bytes, memory_available, resident_need,
)

TEXTS = ["A man plays a guitar.", "The market fell sharply today.", "Cats sleep.", "Rain is expected tomorrow in the north."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("memory") / "olmoe"
    # Wide enough (12M parameters) that int8's saving is larger than its fixed quantization buffers.
    config = {**SMALL_CONFIGS["olmoe"], "hidden_size": 256, "intermediate_size": 256}
    write_random_checkpoint(directory, config, dtype="bfloat16", seed=3)
    (directory.parent / "texts.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return directory


def need(directory: Path, dtype: torch.dtype, int8: bool = False, lm_head: bool = True) -> int:
    groups = name_map_groups(read_config(directory))
    if not lm_head:
        groups[-1] = {k: v for k, v in groups[-1].items() if k != "lm_head.weight"}
    return resident_need(groups, ShardReader(shard_files(directory)), dtype, int8, False)


@pytest.fixture
def no_reads(monkeypatch):
    """Fail the test if any tensor bytes are read from a shard."""
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(checkpoint, "_read_bytes", refuse)


def test_needs_grow_with_dtype_and_shrink_with_int8(model_dir):
    f32, bf16, i8 = need(model_dir, torch.float32), need(model_dir, torch.bfloat16), need(model_dir, torch.bfloat16, int8=True)
    assert i8 < bf16 < f32
    weights = sum(p.numel() for p in load_model(model_dir).parameters())
    # float32 weights are 4 bytes each; the estimate adds the read-ahead and the 1 GiB allowance, no more than that.
    assert 4 * weights + 2**30 < f32 < 4 * weights + 2**30 + 3 * 4 * weights // 10


@pytest.mark.parametrize("native", [True, False])
def test_api_refuses_before_reading_and_names_the_modes_that_fit(model_dir, no_reads, monkeypatch, native):
    """bf16 is offered first where the CPU computes it natively; elsewhere after int8, saying it is slow there."""
    from moee_ref.loading import memory

    why = "oneDNN reports no bf16 path on this CPU"
    monkeypatch.setattr(memory, "bf16_native", lambda device: (native, "native" if native else why))
    f32 = need(model_dir, torch.float32)
    bf16 = need(model_dir, torch.bfloat16)
    limit = (f32 + bf16) // 2  # bf16 fits, float32 does not
    with pytest.raises(InsufficientMemoryError) as caught:
        load_model(model_dir, dtype=torch.float32, memory_limit=limit)
    message = str(caught.value)
    opening = (f"loading {model_dir} resident float32 needs about {format_bytes(f32)}, more than the {format_bytes(limit, up=False)} "
               "this process may use (the memory limit given); nothing was read. Modes that fit: ")
    bf16_mode = f"resident bfloat16 (about {format_bytes(bf16)}{'' if native else '; slow here: ' + why}): dtype=torch.bfloat16 or --dtype bfloat16; "
    int8_mode = "resident int8 (float32 compute) (about "
    assert message.startswith(opening + (bf16_mode if native else int8_mode)), message
    assert bf16_mode in message and "int8=True or --dtype float32 --int8" in message
    assert (message.index(bf16_mode) < message.index(int8_mode)) == native
    assert message.endswith("If the memory will be there (other processes about to end), pass memory_limit= or --memory-limit.")
    assert isinstance(caught.value, MemoryError)


def test_nothing_fits_says_so(model_dir, no_reads):
    with pytest.raises(InsufficientMemoryError, match=r"No mode fits, not even layer-streamed int8: free memory or use a machine with more\."):
        MoEEmbedder.from_pretrained(model_dir, dtype=torch.float32, memory_limit="100MB")


def test_a_mode_that_fits_loads(model_dir):
    limit = need(model_dir, torch.float32, lm_head=False) + 2**20
    embedder = MoEEmbedder.from_pretrained(model_dir, dtype=torch.float32, memory_limit=limit)
    assert embedder.encode(TEXTS[:1], "hs").shape == (1, 256)


def test_streamed_run_that_would_exceed_the_limit_is_refused(model_dir, no_reads):
    embedder = MoEEmbedder.from_pretrained(model_dir, dtype=torch.float32, memory_budget="8GB", memory_limit="400MB")
    # 8000 texts of about 10 tokens: 80 MB of hidden states on top of the 0.3 GiB the smallest budget needs.
    with pytest.raises(InsufficientMemoryError, match=r"^this run in memory budget 8\.00 GiB would take about 0\.4[0-9] GiB, more than the "
                       r"0\.39 GiB this process may use \(the memory limit given\); nothing was read\. "
                       r"pass --memory-budget 0\.35 GiB or less \(more of the activations go to disk\)$"):
        embedder.encode(TEXTS * 2000, "hs", batch_size=64)


def test_choose_mode_order(model_dir):
    bf16 = need(model_dir, torch.bfloat16, lm_head=False)
    i8 = need(model_dir, torch.bfloat16, int8=True, lm_head=False)
    assert choose_mode(model_dir, torch.bfloat16, bf16) == (choose_mode(model_dir, torch.bfloat16)[0], None)
    mode, note = choose_mode(model_dir, torch.bfloat16, (bf16 + i8) // 2)
    assert (mode.dtype, mode.int8, mode.memory_budget) == (torch.bfloat16, True, None)
    assert note.startswith(f"resident bfloat16 needs about {format_bytes(bf16)}, more than the") and "running resident int8 (bfloat16 compute)" in note
    mode, note = choose_mode(model_dir, torch.bfloat16, "1GB")  # under the 1 GiB allowance: only layer-streamed fits
    assert (mode.int8, mode.memory_budget) == (False, 3 * 2**28)
    assert "running layer-streamed bfloat16 within 0.75 GiB instead" in note


def moee(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moee_ref.cli.main", *map(str, argv)], capture_output=True, text=True, timeout=300)


def test_cli_picks_the_first_mode_that_fits_and_says_so(model_dir):
    texts = model_dir.parent / "texts.txt"
    auto = MoEEmbedder.from_pretrained(model_dir).model.dtype  # the CLI's default dtype: bfloat16 where native, else float32
    bf = need(model_dir, auto, lm_head=False)
    i8 = need(model_dir, auto, int8=True, lm_head=False)
    out = model_dir.parent / "int8.npy"
    result = moee("embed", "--model", model_dir, "--input", texts, "--output", out, "--kind", "hs", "--memory-limit", (bf + i8) // 2)
    assert result.returncode == 0, result.stderr
    name = str(auto).removeprefix("torch.")
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and re.fullmatch(
        rf"moee: resident {name} needs about [0-9.]+ GiB, more than the [0-9.]+ GiB this process may use \(the memory limit given\); "
        rf"running resident int8 \({name} compute\) \(about [0-9.]+ GiB\) instead\. --dtype, --int8 or --memory-budget choose the mode yourself",
        lines[0]), lines[0]
    # What int8 ran: the matmuls (kernels/int8.py) and the prepared cache (loading/prepared.py), built by this first int8 load.
    assert re.fullmatch(r"int8: (int8 x int8 through fbgemm|int8 x int16 through AVX2 dot products|weight-only int8).*; prepared cache built at .+: no prepared cache yet", lines[2]), lines[2]
    expected = MoEEmbedder.from_pretrained(model_dir, dtype=auto, int8=True).encode(TEXTS, "hs")
    np.testing.assert_array_equal(np.load(out), expected)


def test_cli_never_overrides_an_explicit_mode(model_dir):
    texts = model_dir.parent / "texts.txt"
    out = model_dir.parent / "never.npy"
    limit = need(model_dir, torch.float32, lm_head=False) - 2**20
    result = moee("embed", "--model", model_dir, "--input", texts, "--output", out, "--dtype", "float32", "--memory-limit", limit)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "resident float32 needs about" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_cgroup_v2_limit_counts_reclaimable_cache_as_free(tmp_path):
    group = tmp_path / "fs" / "job"
    group.mkdir(parents=True)
    (tmp_path / "self").write_text("0::/job\n")
    (group / "memory.max").write_text(f"{8 * 2**30}\n")
    (group / "memory.current").write_text(f"{5 * 2**30}\n")
    (group / "memory.stat").write_text(f"anon 1\ninactive_file {2**30}\n")
    assert _cgroup_room(tmp_path / "fs", tmp_path / "self") == 4 * 2**30
    (group / "memory.max").write_text("max\n")
    assert _cgroup_room(tmp_path / "fs", tmp_path / "self") is None


def test_cgroup_v1_limit(tmp_path):
    group = tmp_path / "fs" / "memory" / "job"
    group.mkdir(parents=True)
    (tmp_path / "self").write_text("4:memory:/job\n3:cpu,cpuacct:/job\n")
    (group / "memory.limit_in_bytes").write_text(f"{2**31}\n")
    (group / "memory.usage_in_bytes").write_text(f"{2**30}\n")
    assert _cgroup_room(tmp_path / "fs", tmp_path / "self") == 2**30


def test_memory_available_reports_its_source():
    assert memory_available("3GB") == (3 * 2**30, "the memory limit given")
    available, source = memory_available()
    assert available > 0 and source in ("MemAvailable", "the cgroup memory limit", "no memory figure on this system")


@pytest.mark.parametrize("auto", [torch.bfloat16, torch.float32])
def test_info_lists_int8_in_the_auto_dtype_and_marks_emulated_bf16(model_dir, no_reads, monkeypatch, auto):
    """`moee info`'s memory line: int8 in the compute dtype "auto" picks here; bf16 marked slow where it is emulated."""
    from moee_ref.cli.info import format_facts, model_facts

    monkeypatch.setattr(checkpoint, "resolve_dtype", lambda dtype, device="cpu": (auto, "why"))
    fit = checkpoint.memory_fit(model_dir, memory_limit="64GB")
    name = str(auto).removeprefix("torch.")
    assert [m["mode"] for m in fit["modes"]] == ["resident float32", "resident bfloat16", f"resident int8 ({name} compute)"]
    assert [m["slow"] for m in fit["modes"]] == [False, auto == torch.float32, False]
    assert fit["modes"][2]["need_bytes"] == need(model_dir, auto, int8=True, lm_head=False)
    facts = {**model_facts(read_config(model_dir)), "memory_fit": fit}
    line = next(line for line in format_facts(facts).splitlines() if line.startswith("memory needed"))
    assert ("resident bfloat16" in line) and (("(slow here: no native bf16)" in line) == (auto == torch.float32))
