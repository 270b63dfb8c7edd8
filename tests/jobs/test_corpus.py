"""Corpus jobs (moee_ref/corpus.py): chunked output that equals one encode() bit for bit, resumes after SIGKILL at
several points to the very bytes of an uninterrupted run, and refuses or repairs what does not fit: another
job's manifest, another model, option or input, damaged chunks, a full disk, a job already running."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from embed_fixtures import single_thread  # noqa: F401  (autouse: one torch thread for this module)
from moee_ref import MoEEmbedder, encode_official
from moee_ref.cli import main as cli
from moee_ref.jobs import corpus
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None
needs_pyarrow = pytest.mark.skipif(pa is None, reason="the Parquet tests need the parquet extra (pyarrow)")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# Lengths from 1 to 12 words, out of order, so that the job's length order is not the input order.
TEXTS = [" ".join(["word"] * (1 + (i * 7) % 12) + [f"number {i}"]) for i in range(40)]
BATCH = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("corpus") / "olmoe", SMALL_CONFIGS["olmoe"], seed=21)


@pytest.fixture(scope="module")
def embedder(checkpoint) -> MoEEmbedder:
    return MoEEmbedder.from_pretrained(checkpoint, dtype=torch.float32)


@pytest.fixture
def texts_file(tmp_path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def embed(capsys, checkpoint, texts_file, output, *more) -> tuple[int, str]:
    code = cli.main([str(a) for a in ["embed", "--model", checkpoint, "--input", texts_file, "--output", output,
                                       "--dtype", "float32", "--batch-size", BATCH, "--no-progress", *more]])
    return code, capsys.readouterr().err


def interrupted_job(capsys, monkeypatch, checkpoint, texts_file, output, *more) -> Path:
    """A job whose chunks are all saved and whose output write failed: its parts directory is kept."""
    from moee_ref.io import outputs

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "write_embeddings", fail)
    code, err = embed(capsys, checkpoint, texts_file, output, *more)
    monkeypatch.undo()
    parts = output.with_name(output.name + ".parts")
    assert code == 1
    assert err.splitlines()[-2:] == [
        f"moee embed: note: 40 of 40 rows are saved in {parts}; after fixing the cause, run the same command with --resume",
        "moee embed: error: [Errno 28] No space left on device",
    ]
    return parts


# ---------------------------------------------------------------------------
# Chunks change no vector


@pytest.mark.parametrize("more", [[], ["--chunk-size", "8"], ["--chunk-size", "24"], ["--alpha", "auto", "--chunk-size", "16"],
                                  ["--kind", "rw", "--prompt", "prompteol", "--chunk-size", "16"]])
def test_a_chunked_job_gives_the_bytes_of_one_encode(capsys, checkpoint, embedder, texts_file, tmp_path, more):
    output = tmp_path / "v.npy"
    code, err = embed(capsys, checkpoint, texts_file, output, *more)
    assert code == 0, err
    options = dict(zip(more[::2], more[1::2]))
    alpha = options.get("--alpha", "1.0")
    expected = embedder.encode(TEXTS, options.get("--kind", "moee-sum"), prompt=options.get("--prompt"),
                               alpha=alpha if alpha == "auto" else float(alpha), batch_size=BATCH)
    assert np.load(output).tobytes() == expected.tobytes()
    assert sorted(os.listdir(tmp_path)) == ["texts.txt", "v.npy", "v.npy.json"]  # the parts directory is gone


def test_official_and_streamed_jobs_are_chunk_size_independent(capsys, checkpoint, embedder, texts_file, tmp_path):
    code, _ = embed(capsys, checkpoint, texts_file, tmp_path / "official.npy", "--mode", "official", "--chunk-size", "16")
    assert code == 0
    expected = encode_official(embedder, TEXTS, batch_size=BATCH)
    assert np.load(tmp_path / "official.npy").tobytes() == expected.tobytes()
    for size in ("8", "32"):
        code, _ = embed(capsys, checkpoint, texts_file, tmp_path / f"streamed-{size}.npy", "--kind", "hs",
                        "--memory-budget", "1GB", "--chunk-size", size)
        assert code == 0
    assert (tmp_path / "streamed-8.npy").read_bytes() == (tmp_path / "streamed-32.npy").read_bytes()


def test_chunk_size_must_be_whole_batches(capsys, checkpoint, texts_file, tmp_path):
    code, err = embed(capsys, checkpoint, texts_file, tmp_path / "v.npy", "--chunk-size", "12")
    assert code == 2
    assert err.strip() == ("moee embed: error: --chunk-size 12 is not a multiple of --batch-size 8 (a chunk is whole batches) "
                           "(see moee embed --help)")


def test_the_automatic_chunk_size_follows_the_measured_rate():
    sizer = corpus._ChunkSizer(8, None, streamed=False)
    assert sizer.next() == 8  # the first chunk is one batch
    sizer.took(8, 1.0)
    assert sizer.next() == 32  # 960 rows would take 2 minutes at that rate, but growth is at most 4x
    sizer.took(32, 60.0)
    assert sizer.next() == 64
    sizer.took(64, 240.0)
    assert sizer.next() == 32  # slower than the target: smaller
    streamed = corpus._ChunkSizer(8, None, streamed=True)
    streamed.took(8, 100.0)  # one pass over the layers takes ~100 s: chunks aim at 4 passes, not 2 minutes
    assert streamed.target == 400.0 and streamed.next() == 32
    fixed = corpus._ChunkSizer(8, 48, streamed=False)
    fixed.took(48, 1000.0)
    assert fixed.next() == 48


# ---------------------------------------------------------------------------
# SIGKILL at several points, then --resume: the bytes of an uninterrupted run


KILL_SCRIPT = textwrap.dedent("""
    import io, os, signal, sys
    from moee_ref.cli import main as cli
    from moee_ref.jobs import corpus
    from moee_ref.io import outputs

    where, count = sys.argv[1], int(sys.argv[2])
    writes = []
    real_write = corpus._write_atomic

    def write(path, data):
        # chunk: killed before the count-th chunk's array is written; record: after its array, before its checksum
        if path.name.startswith("chunk-"):
            writes.append(path.suffix)
            chunks = writes.count(".npy")
            if where == "chunk" and path.suffix == ".npy" and chunks == count + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            if where == "record" and path.suffix == ".json" and chunks == count + 1:
                os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, data)

    corpus._write_atomic = write
    if where == "output":  # half-way through writing the output file
        real_save = outputs.np.save
        def half(handle, array, allow_pickle):
            if isinstance(handle, io.BytesIO):  # a chunk, saved in memory first
                return real_save(handle, array, allow_pickle=allow_pickle)
            handle.write(b"half")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        outputs.np.save = half
    sys.exit(cli.main(sys.argv[3:]))
""")


@pytest.mark.parametrize("where, count, chunking", [
    ("chunk", 0, ["--chunk-size", "8"]),  # before any chunk is saved
    ("chunk", 1, []),  # after the first chunk, automatic sizes; resumed at a fixed size below
    ("record", 2, ["--chunk-size", "8"]),  # the third chunk's array saved, not its checksum
    ("chunk", 4, ["--chunk-size", "8"]),  # all but the last
    ("output", 0, ["--chunk-size", "16"]),  # every chunk saved, the output half written
])
def test_sigkill_then_resume_gives_the_uninterrupted_bytes(capsys, checkpoint, texts_file, tmp_path, where, count, chunking):
    reference = tmp_path / "reference.npy"
    assert embed(capsys, checkpoint, texts_file, reference, "--alpha", "auto")[0] == 0
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "v.npy"
    args = ["embed", "--model", checkpoint, "--input", texts_file, "--output", output, "--dtype", "float32", "--batch-size",
            str(BATCH), "--no-progress", "--alpha", "auto", *chunking]
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, where, str(count), *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # No output; after a kill in the output's write, its temporary file (a hidden name), which the resume removes.
    assert [p.name for p in out_dir.iterdir() if not p.name.startswith(".v.npy.")] == ["v.npy.parts"]
    code, err = embed(capsys, checkpoint, texts_file, output, "--alpha", "auto")
    assert code == 1
    assert err.strip() == (f"moee embed: error: {output}.parts holds an unfinished job for {output}: pass --resume to continue it, "
                           f"or remove {output}.parts to start again")
    code, err = embed(capsys, checkpoint, texts_file, output, "--alpha", "auto", "--resume", "--chunk-size", "16")
    assert code == 0, err
    saved = {"chunk": 8 * count if chunking else 8, "record": 16, "output": 40}[where]
    assert err.splitlines()[0] == f"moee embed: resuming: {saved} of 40 rows are saved in {output}.parts ({saved // 8 if where != 'output' else 3} chunks)"
    assert output.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in out_dir.iterdir()) == ["v.npy", "v.npy.json"]


# ---------------------------------------------------------------------------
# Bad input: refusals and repairs


def test_resume_without_a_job_is_refused(capsys, checkpoint, texts_file, tmp_path):
    output = tmp_path / "v.npy"
    code, err = embed(capsys, checkpoint, texts_file, output, "--resume")
    assert code == 1
    assert err.strip() == (f"moee embed: error: --resume: there is no unfinished job for {output} ({output}.parts does not exist); "
                           "run without --resume to start one")


def test_a_resume_with_another_model_option_or_input_is_refused(capsys, monkeypatch, checkpoint, texts_file, tmp_path):
    output = tmp_path / "v.npy"
    parts = interrupted_job(capsys, monkeypatch, checkpoint, texts_file, output, "--chunk-size", "16")
    other = write_random_checkpoint(tmp_path / "other", SMALL_CONFIGS["olmoe"], seed=22)
    code, err = embed(capsys, other, texts_file, output, "--resume")
    assert code == 1
    saved = json.loads((parts / "manifest.json").read_text())["model"]["revision"]
    new = corpus.model_identity(other)["revision"]
    assert err.strip() == (
        f"moee embed: error: --resume refused: this command differs from the job saved in {parts}: model.name is \"other\" here, "
        f"\"olmoe\" in the saved job; model.revision is \"{new}\" here, \"{saved}\" in the saved job. "
        f"Resume with the job's own command, or remove {parts} to start again"
    )
    code, err = embed(capsys, checkpoint, texts_file, output, "--resume", "--kind", "hs", "--prompt", "prompteol")
    assert code == 1
    assert ("this command differs from the job saved in " + str(parts) + ": settings.kind is \"hs\" here, \"moee-sum\" in the saved "
            "job; settings.prompt is \"prompteol\" here, null in the saved job.") in err
    changed = tmp_path / "changed.txt"
    changed.write_text("\n".join(TEXTS[:-1] + ["another text"]) + "\n")
    code, err = embed(capsys, checkpoint, changed, output, "--resume")
    assert code == 1
    assert ": input.sha256 is \"" in err and err.count("\n") == 1
    code, err = embed(capsys, checkpoint, texts_file, output, "--resume", "--dtype", "bfloat16")
    assert code == 1
    assert "computed.dtype is \"bfloat16\" here, \"float32\" in the saved job" in err
    assert sorted(p.name for p in parts.iterdir() if p.suffix == ".npy") == [
        "chunk-000000000-000000016.npy", "chunk-000000016-000000032.npy", "chunk-000000032-000000040.npy"]  # refusals keep the work


def test_a_manifest_from_another_job_is_refused(capsys, monkeypatch, checkpoint, texts_file, tmp_path):
    output = tmp_path / "v.npy"
    parts = interrupted_job(capsys, monkeypatch, checkpoint, texts_file, output)
    manifest = json.loads((parts / "manifest.json").read_text())
    (parts / "manifest.json").write_text(json.dumps({**manifest, "output": "/elsewhere/w.npy"}))
    code, err = embed(capsys, checkpoint, texts_file, output, "--resume")
    assert err.strip() == (f"moee embed: error: {parts}/manifest.json belongs to the job writing /elsewhere/w.npy, not {output}; "
                           f"resume that job there, or remove {parts}")
    (parts / "manifest.json").write_text('{"format": "moee-ref corpus job", "version": 7}')
    code, err = embed(capsys, checkpoint, texts_file, output, "--resume")
    assert err.strip() == (f"moee embed: error: {parts}/manifest.json is of job format version 7, this moee-ref reads version 1; "
                           f"finish it with the moee-ref that started it, or remove {parts}")
    (parts / "manifest.json").write_text('{"format": "moee-ref corpus')
    code, err = embed(capsys, checkpoint, texts_file, output, "--resume")
    assert code == 1
    assert err.startswith(f"moee embed: error: {parts}/manifest.json is unreadable or not valid JSON (")
    assert err.strip().endswith(f"); remove {parts} and run without --resume")


@pytest.mark.parametrize("damage", ["flip", "truncate", "no record"])
def test_a_damaged_chunk_is_computed_again(capsys, monkeypatch, checkpoint, texts_file, tmp_path, damage):
    reference = tmp_path / "reference.npy"
    assert embed(capsys, checkpoint, texts_file, reference, "--chunk-size", "16")[0] == 0
    output = tmp_path / "v.npy"
    parts = interrupted_job(capsys, monkeypatch, checkpoint, texts_file, output, "--chunk-size", "16")
    victim = parts / "chunk-000000016-000000032.npy"
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x40
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
    else:
        victim.with_suffix(".json").unlink()
    code, err = embed(capsys, checkpoint, texts_file, output, "--resume")
    assert code == 0, err
    lines = err.splitlines()
    if damage == "no record":  # an array without its checksum was never finished: recomputed without a word
        assert lines[0] == f"moee embed: resuming: 24 of 40 rows are saved in {parts} (2 chunks)"
    else:
        assert lines[:2] == [
            f"moee embed: {victim.name} in {parts} is damaged or incomplete (its checksum or shape does not match): computing its 16 rows again",
            f"moee embed: resuming: 24 of 40 rows are saved in {parts} (2 chunks)",
        ]
    assert output.read_bytes() == reference.read_bytes()


def test_a_full_disk_is_refused_before_the_work(capsys, monkeypatch, checkpoint, texts_file, tmp_path):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(corpus.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 20000, 20000))
    computed = []
    monkeypatch.setattr(MoEEmbedder, "features", lambda *a, **k: computed.append(1))
    output = tmp_path / "v.npy"
    code, err = embed(capsys, checkpoint, texts_file, output)
    assert code == 1
    # chunks 40 x 128 x 4 bytes, the output as much again
    assert err.strip() == (f"moee embed: error: not enough free space for {tmp_path}: the job writes about 41.0 KB (its chunks and "
                           "the output), the disk has 20.0 KB free; free some space or write the output elsewhere")
    assert computed == [] and os.listdir(tmp_path) == ["texts.txt"]


def test_a_job_already_running_is_refused(capsys, monkeypatch, checkpoint, texts_file, tmp_path):
    output = tmp_path / "v.npy"
    parts = interrupted_job(capsys, monkeypatch, checkpoint, texts_file, output)
    with open(parts / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # flock is per open file: this process's job is a second holder
        code, err = embed(capsys, checkpoint, texts_file, output, "--resume")
    assert code == 1
    assert err.strip() == f"moee embed: error: another moee embed is running the job in {parts}; wait for it to end, or stop it first"
    assert embed(capsys, checkpoint, texts_file, output, "--resume")[0] == 0


def test_an_error_in_the_first_chunk_leaves_nothing(capsys, monkeypatch, checkpoint, texts_file, tmp_path):
    from moee_ref.errors import NumericalError

    def bad(*args, **kwargs):
        raise NumericalError("non-finite values")

    monkeypatch.setattr(MoEEmbedder, "features", bad)
    code, err = embed(capsys, checkpoint, texts_file, tmp_path / "v.npy")
    assert (code, err.strip()) == (1, "moee embed: error: non-finite values")
    assert os.listdir(tmp_path) == ["texts.txt"]


# ---------------------------------------------------------------------------
# Parquet and CSV


@needs_pyarrow
def test_parquet_output_and_parquet_and_csv_inputs(capsys, checkpoint, texts_file, tmp_path):
    import hashlib

    assert embed(capsys, checkpoint, texts_file, tmp_path / "v.npy")[0] == 0
    vectors = np.load(tmp_path / "v.npy")
    code, err = embed(capsys, checkpoint, texts_file, tmp_path / "v.parquet", "--chunk-size", "16")
    assert code == 0, err
    table = pq.read_table(tmp_path / "v.parquet")
    assert table.schema.names == ["row", "text_sha256", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 128)
    assert table.column("row").to_pylist() == list(range(40))
    assert table.column("text_sha256").to_pylist() == [hashlib.sha256(t.encode()).hexdigest() for t in TEXTS]
    assert np.asarray(table.column("embedding").to_pylist(), np.float32).tobytes() == vectors.tobytes()

    pq.write_table(pa.table({"doc": TEXTS, "n": list(range(40))}), tmp_path / "in.parquet")
    with open(tmp_path / "in.csv", "w", newline="") as handle:
        handle.write("n,doc\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS)))
    for source in ("in.parquet", "in.csv"):
        code, err = embed(capsys, checkpoint, tmp_path / source, tmp_path / f"{source}.npy", "--text-field", "doc")
        assert code == 0, err
        assert (tmp_path / f"{source}.npy").read_bytes() == (tmp_path / "v.npy").read_bytes()
    code, err = embed(capsys, checkpoint, tmp_path / "in.parquet", tmp_path / "x.npy")
    assert err.strip() == (f"moee embed: error: {tmp_path}/in.parquet: no column 'text' (columns: doc, n); "
                           "name the text column with --text-field")
    code, err = embed(capsys, checkpoint, tmp_path / "in.csv", tmp_path / "x.npy", "--field", "body")
    assert err.strip() == (f"moee embed: error: {tmp_path}/in.csv, line 1 (the header): no column 'body' (columns: n, doc); "
                           "name the text column with --text-field")
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "nulls.parquet")
    code, err = embed(capsys, checkpoint, tmp_path / "nulls.parquet", tmp_path / "x.npy")
    assert err.strip() == (f"moee embed: error: {tmp_path}/nulls.parquet, row 2: column 'text' is null")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    code, err = embed(capsys, checkpoint, tmp_path / "ints.parquet", tmp_path / "x.npy")
    assert err.strip() == f"moee embed: error: {tmp_path}/ints.parquet: column 'text' holds int64, not strings"


def test_parquet_without_pyarrow_is_refused_before_the_work(capsys, monkeypatch, checkpoint, texts_file, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    monkeypatch.setattr(cli, "load_embedder", lambda ns: pytest.fail("the model was loaded before the format was checked"))
    code, err = embed(capsys, checkpoint, texts_file, tmp_path / "v.parquet")
    assert (code, err.strip()) == (1, f"moee embed: error: the output {tmp_path}/v.parquet: Parquet files need the optional "
                                      "pyarrow package: pip install pyarrow (in a clone of moee-ref: pip install -e '.[parquet]')")


def test_the_ray_engine_without_ray_says_how_to_install_it(capsys, monkeypatch, checkpoint, texts_file, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    code, err = embed(capsys, checkpoint, texts_file, tmp_path / "v.npy", "--engine", "ray")
    assert (code, err.strip()) == (1, "moee embed: error: --engine ray needs the optional ray[data] package: "
                                      "pip install 'ray[data]' (in a clone of moee-ref: pip install -e '.[distributed]')")
    assert os.listdir(tmp_path) == ["texts.txt"]


def test_ray_options_without_the_ray_engine_are_refused(capsys, checkpoint, texts_file, tmp_path):
    code, err = embed(capsys, checkpoint, texts_file, tmp_path / "v.npy", "--workers", "2")
    assert (code, err.strip()) == (2, "moee embed: error: --ray-address, --workers and --cpus-per-worker are options of "
                                      "--engine ray (see moee embed --help)")
