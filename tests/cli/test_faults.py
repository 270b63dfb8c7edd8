"""Bad input and faults: stop signals, unwritable or special outputs, non-finite numbers, configs and
indexes out of range, and the messages each gives. Each test names the fault it provokes; the
expected outcome is one clear error (or a clean stop) and nothing half-written left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

# One torch thread here as in the subprocesses (OMP_NUM_THREADS=1): the same sums in the same order, so that a
# resumed run's bytes can be compared with a run made here (on an AVX2 CPU two threads summed differently).
from embed_fixtures import single_thread  # noqa: F401  (an autouse fixture)
from moee_ref import MoEEmbedder, load_model
from moee_ref.cli import main as cli
from moee_ref.errors import CheckpointError, ConfigError, InputError, NumericalError, UnknownOptionError
from moee_ref.cli.common import stop_signals_unwind
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint
from moee_ref.loading.checkpoint import INDEX_FILE
from moee_ref.loading.streamed import StreamedModel
from moee_ref.io.outputs import write_embeddings
from moee_ref.loading.tokenizer import Tokenizer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TEXTS = [f"text number {i} about {['cats', 'rain', 'markets', 'music'][i % 4]}" for i in range(40)]
BATCH = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("faults") / "olmoe", SMALL_CONFIGS["olmoe"], seed=5)


@pytest.fixture
def texts_file(tmp_path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def run_cli(capsys, *args) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def smallest_budget(directory: Path) -> int:
    """The budget that keeps one batch in memory and spills all the others."""
    tokenizer = Tokenizer.from_dir(directory)
    lengths = [len(tokenizer.encode_batch([t]).input_ids[0]) for t in TEXTS]
    shapes = [(len(lengths[i:i + BATCH]), max(lengths[i:i + BATCH])) for i in range(0, len(lengths), BATCH)]
    probe = StreamedModel(directory, memory_budget=2**40)
    return probe.memory_plan(shapes)["smallest"]


# ---------------------------------------------------------------------------
# 1. Stop signals: SIGTERM and SIGHUP clean up as Ctrl-C does


# Runs `moee embed` in a fresh process and sends it `signal` (twice with "twice") at a chosen moment: while the
# activations are spilled (the first write to the spill file), or half-way through writing the output file.
SIGNAL_SCRIPT = textwrap.dedent("""
    import io, os, signal, sys, time
    import numpy as np
    from moee_ref.cli import main as cli
    from moee_ref.loading import streamed

    where, sig, times = sys.argv[1], getattr(signal, sys.argv[2]), int(sys.argv[3])
    sent = []
    # As started from a terminal, where Ctrl-C is live: a suite run as a background job of a script inherits SIGINT
    # ignored, and moee embed rightly leaves an ignored signal ignored (nohup).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def hit(*args, **kwargs):
        if not sent:
            sent.append(True)
            for _ in range(times):
                os.kill(os.getpid(), sig)
                time.sleep(0.5)  # the handler runs during the sleep
            if times > 1 or where == "output":
                raise AssertionError("the signal did not stop the job at once")
        return real(*args, **kwargs)

    if where == "spill":
        real = streamed.ActivationStore.put
        streamed.ActivationStore.put = hit
    else:
        real_save = np.save
        def real(handle, array, allow_pickle):
            return real_save(handle, array, allow_pickle=allow_pickle)
        def half_then_hit(handle, array, allow_pickle):
            if isinstance(handle, io.BytesIO):  # a chunk, saved in memory first
                return real_save(handle, array, allow_pickle=allow_pickle)
            handle.write(b"\\x93NUMPY half an array")
            handle.flush()
            hit(handle, array, allow_pickle)
        np.save = half_then_hit
    sys.exit(cli.main(sys.argv[4:]))
""")


def embed_args(checkpoint, texts_file, output, spill_dir, *more):
    return ["embed", "--model", checkpoint, "--input", texts_file, "--output", output, "--kind", "hs", "--dtype", "float32",
            "--batch-size", str(BATCH), "--chunk-size", str(2 * BATCH), "--no-progress",
            "--memory-budget", str(smallest_budget(checkpoint)), "--spill-dir", spill_dir, *more]


@pytest.mark.parametrize("where, signame, times", [
    ("spill", "SIGTERM", 1), ("spill", "SIGHUP", 1), ("spill", "SIGTERM", 2), ("spill", "SIGINT", 2),
    ("output", "SIGTERM", 1), ("output", "SIGHUP", 1), ("spill", "SIGKILL", 1),
])
def test_stop_signal_leaves_no_partial_output_and_no_spill_file(checkpoint, tmp_path, texts_file, where, signame, times):
    """One stop signal: the chunk in flight is finished and saved, then the job stops, resumable (during the final
    write: the output's temporary file is removed). A second: the job stops at once, the chunk in flight lost."""
    out_dir, spill_dir = tmp_path / "out", tmp_path / "spill"
    out_dir.mkdir(), spill_dir.mkdir()
    output, parts = out_dir / "vectors.npy", out_dir / "vectors.npy.parts"
    args = [str(a) for a in embed_args(checkpoint, texts_file, output, spill_dir)]
    proc = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, where, signame, str(times), *args],
                          capture_output=True, text=True, env=ENV, timeout=300)
    signum = getattr(signal, signame)
    assert os.listdir(spill_dir) == []  # even after SIGKILL: the spill file's name went when it was mapped
    if signum == signal.SIGKILL:  # nothing runs after it; only the spill file's early unlinking holds
        assert proc.returncode == -signal.SIGKILL
        return
    assert proc.returncode == (130 if signum == signal.SIGINT else 128 + signum), proc.stderr
    last = proc.stderr.splitlines()[-1]
    if times == 2:  # stopped in the first chunk, at once: nothing saved, nothing left
        stop = "interrupted" if signum == signal.SIGINT else f"stopped by {signame}"
        assert last == f"moee embed: {stop}; nothing was left half-written"
        assert os.listdir(out_dir) == []
        return
    if where == "spill":
        assert last == f"moee embed: stopped by {signame}; 16 of 40 rows are saved in {parts}: run the same command with --resume to continue"
    else:
        assert last == f"moee embed: stopped by {signame}; all 40 rows are saved in {parts}: the same command with --resume writes the output"
    assert os.listdir(out_dir) == [parts.name]  # neither the output nor its temporary file
    resumed = subprocess.run([sys.executable, "-m", "moee_ref.cli.main", *args, "--resume"], capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    reference = out_dir / "reference.npy"
    assert cli.main([str(a) for a in embed_args(checkpoint, texts_file, reference, spill_dir)]) == 0
    assert output.read_bytes() == reference.read_bytes()
    assert sorted(os.listdir(out_dir)) == ["reference.npy", "reference.npy.json", "vectors.npy", "vectors.npy.json"]


def test_an_ignored_stop_signal_stays_ignored():
    """Under nohup SIGHUP is ignored; the command line must not start reacting to it."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_signals_unwind():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


# ---------------------------------------------------------------------------
# 6. and 7. Outputs: checked before the work; existing files keep their mode; special files are refused


def test_output_inside_a_file_is_refused_before_loading(capsys, tmp_path, texts_file):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    # The model does not exist: an error about the output proves it came first.
    code, err = run_cli(capsys, "embed", "--model", tmp_path / "no-model", "--input", texts_file, "--output", blocker / "v.npy")
    assert code == 1
    assert err.strip() == f"moee embed: error: {blocker} is a file, not a directory; the output {blocker / 'v.npy'} cannot be written inside it"


def test_output_in_an_unwritable_directory_is_refused_before_loading(capsys, tmp_path, texts_file):
    # sysfs refuses new files to everyone, root included (a chmod'ed directory does not stop root).
    code, err = run_cli(capsys, "embed", "--model", tmp_path / "no-model", "--input", texts_file, "--output", "/sys/v.npy")
    assert code == 1
    assert err.strip() == (
        "moee embed: error: cannot write the output /sys/v.npy: no new file can be made in /sys (Permission denied); "
        "choose a directory you can write to"
    )


def test_existing_output_keeps_its_mode(tmp_path):
    for mode in (0o600, 0o640, 0o444):
        path = tmp_path / f"private-{mode:o}.npy"
        path.write_bytes(b"old")
        path.chmod(mode)
        write_embeddings(path, np.ones((2, 3)), "npy")
        assert stat.S_IMODE(path.stat().st_mode) == mode
        np.testing.assert_array_equal(np.load(path), np.ones((2, 3), dtype=np.float32))


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_special_file_output_is_refused_and_left_alone(capsys, tmp_path, texts_file, kind):
    if kind == "fifo":
        node = tmp_path / "pipe"
        os.mkfifo(node)
        described, noun = "a FIFO", "FIFO"
    else:
        node = Path("/dev/null")
        described, noun = "a character device", "device"
    code, err = run_cli(capsys, "embed", "--model", tmp_path / "no-model", "--input", texts_file, "--output", node, "--format", "npy")
    assert code == 1
    assert err.strip() == (
        f"moee embed: error: {node} is {described}, not a regular file; outputs are written to a new file and renamed "
        f"into place, which would replace the {noun} itself: give a regular file's path"
    )
    assert (stat.S_ISFIFO if kind == "fifo" else stat.S_ISCHR)(node.stat().st_mode)


def test_symlink_output_replaces_its_target_and_keeps_the_link(tmp_path):
    target_dir = tmp_path / "elsewhere"
    target_dir.mkdir()
    target, link = target_dir / "real.npy", tmp_path / "link.npy"
    target.write_bytes(b"old")
    target.chmod(0o600)
    link.symlink_to(target)
    write_embeddings(link, np.full((1, 4), 2.0), "npy")
    assert link.is_symlink() and os.readlink(link) == str(target)
    np.testing.assert_array_equal(np.load(target), np.full((1, 4), 2.0, dtype=np.float32))
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(os.listdir(target_dir)) == ["real.npy"]


# ---------------------------------------------------------------------------
# 2. Non-finite outputs are an error naming the layer, never zeros or NaN in a file


def copy_checkpoint(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / directory.name
    shutil.copytree(directory, target)
    return target


def rewrite_tensors(directory: Path, change) -> None:
    """change(name, tensor) -> tensor or None (unchanged), applied to every tensor of every shard."""
    files = sorted(set(json.loads((directory / INDEX_FILE).read_text())["weight_map"].values()))
    for file in files:
        tensors = load_file(str(directory / file))
        changed = {name: change(name, tensor) for name, tensor in tensors.items()}
        save_file({n: (t if changed[n] is None else changed[n]) for n, t in tensors.items()}, str(directory / file),
                  metadata={"format": "pt"})


def poisoned(checkpoint: Path, tmp_path: Path, pattern: str, value: float) -> Path:
    directory = copy_checkpoint(checkpoint, tmp_path)
    rewrite_tensors(directory, lambda name, t: torch.full_like(t, value) if pattern in name else None)
    return directory


NAN_IN_LAYER_2 = "the text at index 0: they first appear at the router of decoder layer 2 (the 2 MoE layer router(s) before it are finite)"
INF_AFTER_LAST_ROUTER = ("the routers are finite: they appear after the router of decoder layer 3 "
                         "(its experts, a later layer or the final norm)")


@pytest.mark.parametrize("kind", ["hs", "rw", "moee-sum", "moee-concat"])
def test_nan_weights_are_an_error_naming_the_layer(checkpoint, tmp_path, kind):
    directory = poisoned(checkpoint, tmp_path, "layers.2.self_attn.o_proj", float("nan"))
    embedder = MoEEmbedder.from_pretrained(directory, dtype=torch.float32)
    with pytest.raises(NumericalError) as info:
        embedder.encode(TEXTS[:3], kind, normalize=True)
    assert str(info.value) == (
        f"non-finite values (NaN or infinity) in the model's outputs for {NAN_IN_LAYER_2}. "
        "The cause is the checkpoint: damaged weights, a wrong config.json (rms_norm_eps, rope_theta)"
    )


def test_inf_weights_after_the_last_router_are_found_in_bf16_and_streamed(checkpoint, tmp_path):
    directory = poisoned(checkpoint, tmp_path, "layers.3.mlp.experts", float("inf"))
    resident = MoEEmbedder.from_pretrained(directory, dtype=torch.bfloat16)
    with pytest.raises(NumericalError, match=f"for the text at index 0: {re.escape(INF_AFTER_LAST_ROUTER)}. The cause is the checkpoint: "
                       r"damaged weights, a wrong config.json \(rms_norm_eps, rope_theta\) or, in a 16-bit dtype, an overflow "
                       r"\(try dtype float32\)$"):
        resident.encode(TEXTS[:2], "hs")
    streamed = MoEEmbedder(StreamedModel(directory, torch.float32, memory_budget=2**30), Tokenizer.from_dir(directory))
    with pytest.raises(NumericalError, match=f"for the text at index 0: {re.escape(INF_AFTER_LAST_ROUTER)}. "):
        streamed.encode(TEXTS[:2], "hs")


def test_nan_names_the_first_bad_text_in_input_order(checkpoint, tmp_path):
    """Only one text is poisoned, through a token only it contains: the embedding row of that token is NaN."""
    directory = copy_checkpoint(checkpoint, tmp_path)
    tokenizer = Tokenizer.from_dir(directory)
    clean = tokenizer.encode("text number", add_special_tokens=False)
    odd = [i for i in tokenizer.encode("zebra xylophone", add_special_tokens=False) if i not in clean]

    def poison_rows(name, tensor):
        if name == "model.embed_tokens.weight":
            tensor = tensor.clone()
            tensor[odd] = float("nan")
            return tensor
        return None

    rewrite_tensors(directory, poison_rows)
    embedder = MoEEmbedder.from_pretrained(directory, dtype=torch.float32)
    texts = ["text number one", "text number two", "zebra xylophone", "text number"]
    with pytest.raises(NumericalError, match=r"for the text at index 2: they first appear at the router of decoder layer 0 \(the first MoE layer\)"):
        embedder.encode(texts, "rw")
    assert embedder.encode(texts[:2] + texts[3:], "rw").shape[0] == 3  # the others embed


def test_cli_nan_exits_1_and_writes_nothing(capsys, checkpoint, tmp_path, texts_file):
    directory = poisoned(checkpoint, tmp_path, "layers.2.self_attn.o_proj", float("nan"))
    output = tmp_path / "out" / "v.npy"
    output.parent.mkdir()
    code, err = run_cli(capsys, "embed", "--model", directory, "--input", texts_file, "--output", output, "--kind", "hs",
                        "--dtype", "float32", "--no-progress")
    assert code == 1
    # The row named as the input counts it (a line of the text file), not by its place in the job.
    assert re.match(rf"moee embed: error: non-finite values \(NaN or infinity\) in the model's outputs for {re.escape(str(texts_file))}, "
                    r"line \d+: ", err.splitlines()[-1]), err
    assert "they first appear at the router of decoder layer 2 " in err
    assert os.listdir(output.parent) == []


# ---------------------------------------------------------------------------
# 3. and 4. Config numbers: floats finite and in range, counts sane and matched to the shards


def with_config(checkpoint: Path, tmp_path: Path, **changes) -> Path:
    directory = copy_checkpoint(checkpoint, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))  # NaN and Infinity as Python's json writes them
    return directory


@pytest.mark.parametrize("field, value, problem", [
    ("rope_theta", float("nan"), "must be a finite number, got nan"),
    ("rope_theta", float("inf"), "must be a finite number, got inf"),
    ("rms_norm_eps", float("inf"), "must be a finite number, got inf"),
    ("rms_norm_eps", -1, "must lie strictly between 0 and 1, got -1.0"),
    ("rms_norm_eps", 0, "must lie strictly between 0 and 1, got 0.0"),
    ("rms_norm_eps", 2.5, "must lie strictly between 0 and 1, got 2.5"),
    ("clip_qkv", float("nan"), "must be a finite number, got nan"),
])
def test_config_floats_are_range_checked(checkpoint, tmp_path, field, value, problem):
    directory = with_config(checkpoint, tmp_path, **{field: value})
    with pytest.raises(ConfigError) as info:
        load_model(directory)
    assert str(info.value) == f"{directory / 'config.json'}: field '{field}' {problem}"


@pytest.mark.parametrize("field, value, limit", [("num_hidden_layers", 100_000_000, 1024), ("num_experts", 10_000_000, 65536)])
def test_huge_config_counts_are_refused_at_once(checkpoint, tmp_path, monkeypatch, field, value, limit):
    monkeypatch.setattr("moee_ref.loading.checkpoint.name_map_groups", no_name_map)
    directory = with_config(checkpoint, tmp_path, **{field: value})
    with pytest.raises(ConfigError) as info:
        load_model(directory)
    assert str(info.value) == (f"{directory / 'config.json'}: field '{field}' is {value}, beyond any real model "
                               f"(at most {limit}); check that config.json is not damaged")


def no_name_map(args):
    raise AssertionError("the name map was built before the config's sizes were checked against the shards")


def test_more_layers_than_the_shards_hold_is_refused_before_the_name_map(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr("moee_ref.loading.checkpoint.name_map_groups", no_name_map)
    directory = with_config(checkpoint, tmp_path, num_hidden_layers=1000)
    with pytest.raises(CheckpointError) as info:
        load_model(directory)
    assert str(info.value) == ("config.json says num_hidden_layers=1000, but the shards hold layers 0 to 3 (4 layer(s)); "
                               "check that config.json belongs to these weights")


def test_more_experts_than_the_shards_hold_is_refused_before_the_name_map(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr("moee_ref.loading.checkpoint.name_map_groups", no_name_map)
    directory = with_config(checkpoint, tmp_path, num_experts=60000)
    with pytest.raises(CheckpointError, match=r"^config.json describes a model of [\d,]+ parameters \(4 layers, 60000 experts "
                       r"of size 32, hidden size 64\), but the shards hold only [\d,]+ bytes of tensors; check that "
                       r"config.json belongs to these weights$"):
        load_model(directory)


# ---------------------------------------------------------------------------
# 5. Bad input that used to end in a traceback


def test_unknown_from_pretrained_option_is_refused_before_loading(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("moee_ref.loading.checkpoint.load_model", no_loading)
    with pytest.raises(UnknownOptionError) as info:
        MoEEmbedder.from_pretrained(tmp_path, dtpye="float32")
    assert str(info.value) == (
        "from_pretrained() got unknown option(s) 'dtpye' (did you mean 'dtype'?); it takes source, dtype, int8, "
        "memory_budget, spill_dir, packed, memory_limit, device, fit, config, cache_dir, prepared_cache, batch_size, share_prefix, "
        "prompts, default_prompt_name"
    )


def test_normalise_misspelt_to_encode_is_named_with_the_fix(checkpoint):
    embedder = MoEEmbedder.from_pretrained(checkpoint, dtype=torch.float32)
    with pytest.raises(UnknownOptionError, match=r"^encode\(\) got unknown option\(s\) 'normalise' \(did you mean 'normalize'\?\); "):
        embedder.encode(TEXTS[:1], "hs", normalise=True)
    assert isinstance(UnknownOptionError("x"), TypeError)  # as Python's own error for a bad keyword is


def test_index_whose_weight_map_is_a_list(checkpoint, tmp_path):
    directory = copy_checkpoint(checkpoint, tmp_path)
    index = directory / INDEX_FILE
    index.write_text(json.dumps({"metadata": {}, "weight_map": ["model-00001.safetensors"]}))
    with pytest.raises(CheckpointError) as info:
        load_model(directory)
    assert str(info.value) == f"{index}: 'weight_map' must map tensor names to shard file names, got list; re-download it"


def moee_process(*args, stdin=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moee_ref.cli.main", *map(str, args)], stdin=stdin, capture_output=True,
                          env=env or ENV, timeout=300)


def test_stdin_closed(tmp_path):
    # `<&-` in a shell: the process starts without a file descriptor 0, and Python's sys.stdin is None.
    proc = subprocess.run(
        ["sh", "-c", f'exec "{sys.executable}" -m moee_ref.cli.main embed --model {tmp_path} --input - --output {tmp_path}/v.npy <&-'],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert (proc.returncode, proc.stderr) == (
        1, "moee embed: error: -: standard input is closed; pipe the texts in, or give a file name instead of -\n")


def test_invalid_utf8_on_stdin_under_a_strict_locale(tmp_path):
    strict = {**ENV, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict"}
    proc = subprocess.run(
        [sys.executable, "-m", "moee_ref.cli.main", "embed", "--model", tmp_path, "--input", "-", "--output", tmp_path / "v.npy"],
        input=b"good line\n\xff\xfe bad bytes\n", capture_output=True, env=strict, timeout=300,
    )
    assert (proc.returncode, proc.stderr.decode()) == (
        1, "moee embed: error: <stdin>: not UTF-8 text (invalid start byte at byte 10)\n")


# ---------------------------------------------------------------------------
# 10. An index may not send the loader outside the checkpoint


@pytest.mark.parametrize("shard", ["/etc/passwd", "../elsewhere.safetensors", "sub/../../x.safetensors", ""])
def test_index_entries_outside_the_checkpoint_are_refused(checkpoint, tmp_path, shard):
    directory = copy_checkpoint(checkpoint, tmp_path)
    index = directory / INDEX_FILE
    content = json.loads(index.read_text())
    first = next(iter(content["weight_map"]))
    content["weight_map"][first] = shard
    index.write_text(json.dumps(content))
    # A real shard where "../elsewhere" points: the refusal is about the name, not a missing file.
    shutil.copy(sorted(directory.glob("*.safetensors"))[0], tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(directory)
    assert str(info.value) == (
        f"{index}: shard name(s) {shard!r} point outside the checkpoint directory; shards must be files inside it. "
        "Refused: re-download the checkpoint from a source you trust"
    )


def test_index_entries_in_a_subdirectory_are_allowed(checkpoint, tmp_path):
    directory = copy_checkpoint(checkpoint, tmp_path)
    index = directory / INDEX_FILE
    content = json.loads(index.read_text())
    (directory / "weights").mkdir()
    for name in sorted(set(content["weight_map"].values())):
        (directory / name).rename(directory / "weights" / name)
    content["weight_map"] = {k: f"weights/{v}" for k, v in content["weight_map"].items()}
    index.write_text(json.dumps(content))
    reference = load_model(checkpoint)
    moved = load_model(directory)
    for (name, a), (_, b) in zip(reference.state_dict().items(), moved.state_dict().items()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------
# 8. Messages that said the wrong thing


def test_unreadable_shard_is_not_called_missing_or_corrupt(checkpoint, tmp_path, monkeypatch):
    from moee_ref.loading import checkpoint as loader

    directory = copy_checkpoint(checkpoint, tmp_path)
    victim = sorted(directory.glob("*.safetensors"))[1]
    real_open = open

    def guarded_open(file, *args, **kwargs):  # what a file without read permission gives a user who is not root
        if Path(file) == victim:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(loader, "open", guarded_open, raising=False)
    with pytest.raises(CheckpointError) as info:
        load_model(directory)
    assert str(info.value) == f"{victim}: cannot open it (Permission denied); check the file's permissions"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permission bits")
def test_unreadable_shard_by_its_mode(checkpoint, tmp_path):
    directory = copy_checkpoint(checkpoint, tmp_path)
    victim = sorted(directory.glob("*.safetensors"))[1]
    victim.chmod(0)
    with pytest.raises(CheckpointError) as info:
        load_model(directory)
    assert str(info.value) == f"{victim}: cannot open it (Permission denied); check the file's permissions"


def test_budget_just_below_the_smallest_is_not_printed_equal(checkpoint):
    smallest = smallest_budget(checkpoint)
    tokenizer = Tokenizer.from_dir(checkpoint)
    embedder = MoEEmbedder(StreamedModel(checkpoint, memory_budget=smallest - 1), tokenizer)
    with pytest.raises(InputError) as info:
        embedder.encode(TEXTS, "hs", batch_size=BATCH)
    given, needed = re.match(r"memory budget (\S+ \S+) is too small .* the smallest budget that works is (\S+ \S+) ",
                             str(info.value)).groups()
    assert given != needed


def write_pairs(path: Path, scores) -> Path:
    path.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for (a, b), s in zip(
        [("A cat sleeps.", "A cat naps."), ("Rain falls.", "Markets rise."), ("He runs.", "He jogs.")], scores)))
    return path


def test_constant_gold_scores_are_refused_with_the_reason(capsys, checkpoint, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.tsv", [3, 3, 3])
    code, err = run_cli(capsys, "eval", "sts", "--model", checkpoint, "--pairs", pairs)
    assert (code, err) == (1, "moee eval sts: error: pairs: all 3 gold scores are 3; correlations with a constant are "
                              "undefined, so check the score column\n")


# ---------------------------------------------------------------------------
# 9. A weight must be stored as a float


def test_integer_weight_is_refused(checkpoint, tmp_path):
    directory = copy_checkpoint(checkpoint, tmp_path)
    name = "model.layers.1.self_attn.q_proj.weight"
    rewrite_tensors(directory, lambda n, t: t.to(torch.int16) if n == name else None)
    with pytest.raises(CheckpointError) as info:
        load_model(directory)
    assert str(info.value) == (
        f"1 weights not stored as floats (F32, BF16, F16, F64): {name} (I16): a weight converted from integers would be "
        "nonsense; the checkpoint is damaged or not a released one"
    )
