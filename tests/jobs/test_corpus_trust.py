"""Corpus jobs a pipeline can trust (issue 31): the input is never the output, every output says what made it and
carries the input's ids, one alpha serves a corpus and its later queries, bad rows are skipped exactly once
(also across a SIGKILL and --resume), and what can be refused is refused before the model runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from embed_fixtures import single_thread  # noqa: F401  (autouse: one torch thread for this module)
from moee_ref import MoEEmbedder, __version__
from moee_ref.cli import main as cli
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint
from moee_ref.embedding.standardize import Standardizer
from moee_ref.jobs import corpus

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
DOCS = [{"doc_id": f"d{i}", "body": " ".join(["word"] * (1 + (i * 5) % 9) + [f"document {i}"]), "lang": "en" if i % 2 else "de"}
        for i in range(24)]
BATCH = 4
FORMATS = ["npy", "jsonl"] + (["parquet"] if pa is not None else [])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("trust") / "olmoe", SMALL_CONFIGS["olmoe"], seed=31)


@pytest.fixture(scope="module")
def embedder(checkpoint) -> MoEEmbedder:
    return MoEEmbedder.from_pretrained(checkpoint, dtype=torch.float32)


@pytest.fixture
def docs(tmp_path) -> Path:
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return path


def embed(capsys, checkpoint, source, output, *more) -> tuple[int, str]:
    code = cli.main([str(a) for a in ["embed", "--model", checkpoint, "--input", source, "--output", output, "--dtype", "float32",
                                       "--batch-size", BATCH, "--no-progress", *more]])
    captured = capsys.readouterr()
    return code, captured.err


def no_model(monkeypatch):
    monkeypatch.setattr(cli, "load_embedder", lambda ns: pytest.fail("the model was loaded before the refusal"))


# ------------------------------------------------------------------ 1. outputs that never harm inputs


@pytest.mark.parametrize("how", ["path", "symlink", "hard link"])
def test_the_input_is_never_the_output(capsys, monkeypatch, checkpoint, docs, how):
    before = docs.read_bytes()
    output = {"path": docs, "symlink": docs.with_name("out.jsonl"), "hard link": docs.with_name("hard.jsonl")}[how]
    if how == "symlink":
        output.symlink_to(docs)
    elif how == "hard link":
        os.link(docs, output)
    no_model(monkeypatch)
    code, err = embed(capsys, checkpoint, docs, output, "--text-field", "body")
    assert code == 2
    assert err == (f"moee embed: error: --output {output} is the input {docs} (the same file); writing it would destroy the input: "
                   "choose another output name (see moee embed --help)\n")
    assert docs.read_bytes() == before


def test_a_format_contradicting_the_suffix_is_refused(capsys, monkeypatch, checkpoint, docs, tmp_path):
    no_model(monkeypatch)
    code, err = embed(capsys, checkpoint, docs, tmp_path / "y.npy", "--text-field", "body", "--format", "parquet")
    assert (code, err) == (2, "moee embed: error: --format parquet contradicts the output name "
                              f"{tmp_path}/y.npy (a .npy file); drop --format, or name the output for parquet (see moee embed --help)\n")
    assert not (tmp_path / "y.npy").exists()


def test_output_dash_streams_jsonl_with_its_provenance_first(capsys, checkpoint, docs, embedder, tmp_path):
    code = cli.main(["embed", "--model", str(checkpoint), "--input", str(docs), "--text-field", "body", "--id-field", "doc_id",
                     "--output", "-", "--dtype", "float32", "--batch-size", str(BATCH), "--no-progress", "--quiet"])
    captured = capsys.readouterr()
    assert (code, captured.err) == (0, "")
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert lines[0]["moee_ref.provenance"]["spec"]["alpha"] == 1.0
    assert [r["id"] for r in lines[1:]] == [d["doc_id"] for d in DOCS]
    expected = embedder.encode([d["body"] for d in DOCS], batch_size=BATCH)
    assert np.asarray([r["embedding"] for r in lines[1:]], np.float32).tobytes() == expected.tobytes()
    assert not any(p.name.startswith("-") for p in tmp_path.iterdir())  # no file named -


def test_tsv_and_json_inputs_are_read_by_what_they_are(capsys, checkpoint, embedder, tmp_path):
    texts = [d["body"] for d in DOCS[:10]]
    (tmp_path / "c.tsv").write_text("text\tn\n" + "".join(f"{t}\t{i}\n" for i, t in enumerate(texts)))
    (tmp_path / "c.json").write_text(json.dumps(texts))
    expected = embedder.encode(texts, batch_size=BATCH)
    for name in ("c.tsv", "c.json"):
        code, err = embed(capsys, checkpoint, tmp_path / name, tmp_path / f"{name}.npy")
        assert code == 0, err
        assert np.load(tmp_path / f"{name}.npy").tobytes() == expected.tobytes()


def test_text_field_on_a_txt_input_is_a_usage_error(capsys, monkeypatch, checkpoint, tmp_path):
    (tmp_path / "c.txt").write_text("one\ntwo\n")
    no_model(monkeypatch)
    code, err = embed(capsys, checkpoint, tmp_path / "c.txt", tmp_path / "v.npy", "--text-field", "body")
    assert code == 2
    assert err.startswith(f"moee embed: error: {tmp_path}/c.txt is read as plain text (one text per line, no fields): --text-field cannot apply")


# ------------------------------------------------------------------ 2, 3. provenance and ids in every format


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_carries_provenance_ids_and_kept_fields(capsys, checkpoint, docs, embedder, tmp_path, fmt):
    output = tmp_path / f"v.{fmt}"
    code, err = embed(capsys, checkpoint, docs, output, "--text-field", "body", "--id-field", "doc_id", "--keep-fields", "lang",
                      "--alpha", "auto", "--prompt", "prompteol")
    assert code == 0, err
    texts = [d["body"] for d in DOCS]
    expected = embedder.encode(texts, alpha="auto", prompt="prompteol", batch_size=BATCH)
    alpha = embedder.last_report.alpha
    assert cli.main(["info", "--output", str(output), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["moee_ref"] == __version__
    assert record["model"]["name"] == "olmoe" and record["model"]["family"] == "olmoe"
    assert record["model"]["revision"] == corpus.model_identity(checkpoint)["revision"]
    assert record["computed"] == {"dtype": "float32", "int8": False, "streamed": False, "device": "cpu"}
    assert {k: record["spec"][k] for k in ("kind", "prompt", "alpha", "standardizers")} == {
        "kind": "moee-sum", "prompt": "prompteol", "alpha": alpha, "standardizers": None}
    assert record["input"] == {"name": str(docs), "format": "jsonl", "rows": 24, "embedded": 24, "skipped": 0,
                               "texts_sha256": corpus.texts_digest(texts)}
    ids, langs = [d["doc_id"] for d in DOCS], [d["lang"] for d in DOCS]
    if fmt == "npy":
        vectors = np.load(output)
        columns = json.loads((tmp_path / "v.npy.json").read_text())["columns"]
        assert columns == {"row": list(range(24)), "id": ids, "lang": langs}
    elif fmt == "jsonl":
        rows = [json.loads(line) for line in output.read_text().splitlines()[1:]]
        assert [(r["row"], r["id"], r["lang"], r["text"]) for r in rows] == list(zip(range(24), ids, langs, texts))
        vectors = np.asarray([r["embedding"] for r in rows], np.float32)
    else:
        table = pq.read_table(output)
        assert table.schema.names == ["row", "id", "lang", "text_sha256", "embedding"]
        assert (table.column("id").to_pylist(), table.column("lang").to_pylist()) == (ids, langs)
        vectors = np.asarray(table.column("embedding").to_pylist(), np.float32)
    assert vectors.tobytes() == expected.tobytes()
    assert cli.main(["info", "--output", str(output)]) == 0
    assert f"  alpha          {json.dumps(alpha)}" in capsys.readouterr().out


# ------------------------------------------------------------------ 4. one alpha for a corpus and its queries


def test_a_saved_config_gives_a_later_query_the_corpus_vectors_bit_for_bit(capsys, checkpoint, docs, tmp_path):
    rw = Standardizer.fit(np.random.default_rng(0).random((5, 4 * 16)), kind="rw")  # 4 MoE layers x 16 experts
    rw.save(tmp_path / "rw.npz")
    code, err = embed(capsys, checkpoint, docs, tmp_path / "v.npy", "--text-field", "body", "--alpha", "auto",
                      "--standardizer", tmp_path / "rw.npz", "--save-config", tmp_path / "cfg.json", "--normalize",
                      "--batch-size", "1")  # batches of one text, as the queries run: the very same float32 sums
    assert code == 0, err
    corpus_vectors = np.load(tmp_path / "v.npy")
    config = json.loads((tmp_path / "cfg.json").read_text())
    provenance = json.loads((tmp_path / "v.npy.json").read_text())["moee_ref.provenance"]
    assert config["spec"]["alpha"] == provenance["spec"]["alpha"] and isinstance(config["spec"]["alpha"], float)
    # Next month, one query at a time, through the API and the CLI: the alpha and vectors of the corpus job.
    later = MoEEmbedder.from_pretrained(checkpoint, dtype=torch.float32, config=tmp_path / "cfg.json")
    for i in (0, 17):
        assert later.encode([DOCS[i]["body"]]).tobytes() == corpus_vectors[i : i + 1].tobytes()
    (tmp_path / "q.txt").write_text(DOCS[5]["body"] + "\n")
    code, err = embed(capsys, checkpoint, tmp_path / "q.txt", tmp_path / "q.npy", "--config", tmp_path / "cfg.json")
    assert code == 0, err
    assert np.load(tmp_path / "q.npy").tobytes() == corpus_vectors[5:6].tobytes()
    code, err = embed(capsys, checkpoint, tmp_path / "q.txt", tmp_path / "q2.npy", "--config", tmp_path / "cfg.json", "--alpha", "3")
    assert (code, err) == (2, f"moee embed: error: --config {tmp_path}/cfg.json holds the embedding settings; drop --alpha "
                              "(or save another configuration with --save-config) (see moee embed --help)\n")


@pytest.mark.parametrize("texts, detail", [(["a b", "c d", "e f"], "got 3"), (["same text"] * 12, "got 1 (12 texts, 1 distinct)")])
def test_alpha_auto_on_too_few_distinct_texts_is_refused_before_the_model(capsys, monkeypatch, checkpoint, tmp_path, texts, detail):
    (tmp_path / "few.txt").write_text("\n".join(texts) + "\n")
    no_model(monkeypatch)
    code, err = embed(capsys, checkpoint, tmp_path / "few.txt", tmp_path / "v.npy", "--alpha", "auto")
    assert code == 1
    assert err == (f"moee embed: error: alpha='auto' needs at least 8 distinct texts to choose alpha reliably, {detail}; give a number, "
                   "or choose alpha once on a larger sample (or alpha_pairs) and reuse it (a saved configuration)\n")
    assert os.listdir(tmp_path) == ["few.txt"]


def test_encode_alpha_auto_on_three_texts_is_refused_not_zero(embedder):
    from moee_ref.errors import InputError

    with pytest.raises(InputError, match=r"^alpha='auto' needs at least 8 distinct texts to choose alpha reliably, got 3;"):
        embedder.encode(["a b", "c d", "e f"], alpha="auto")


# ------------------------------------------------------------------ 5. bad rows


def bad_corpus(path: Path) -> list[int]:
    """DOCS with bad rows at the start, the middle and the end; the good rows' indices in DOCS."""
    lines = ["not json"] + [json.dumps(d) for d in DOCS[:12]] + [json.dumps({"doc_id": "empty", "body": "   "})]
    lines += [json.dumps(d) for d in DOCS[12:]] + [json.dumps({"doc_id": "num", "body": 3})]
    path.write_text("\n".join(lines) + "\n")
    return list(range(24))


def test_the_first_bad_row_stops_the_job_named_by_its_line(capsys, checkpoint, tmp_path):
    bad_corpus(tmp_path / "c.jsonl")
    code, err = embed(capsys, checkpoint, tmp_path / "c.jsonl", tmp_path / "v.npy", "--text-field", "body")
    assert (code, err) == (1, f"moee embed: error: {tmp_path}/c.jsonl, line 1: not valid JSON (Expecting value)\n")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS[:3]) + json.dumps({"body": ""}) + "\n")
    code, err = embed(capsys, checkpoint, tmp_path / "d.jsonl", tmp_path / "v.npy", "--text-field", "body")
    assert code == 1
    assert err.startswith(f"moee embed: error: {tmp_path}/d.jsonl, line 4: the text is empty or whitespace only")
    assert not (tmp_path / "v.npy.parts").exists()


ERRORS = [{"line": 1, "row": 0, "id": None, "reason": "not valid JSON (Expecting value)"},
          {"line": 14, "row": 13, "id": "empty", "reason": None},
          {"line": 27, "row": 26, "id": "num", "reason": "field 'body' is int, not a string"}]


def check_skipped(output: Path, embedder) -> None:
    vectors = np.load(output)
    expected = embedder.encode([d["body"] for d in DOCS], batch_size=BATCH)
    assert vectors.tobytes() == expected.tobytes()  # every good row once, in order
    columns = json.loads(output.with_name(output.name + ".json").read_text())["columns"]
    assert columns["row"] == list(range(1, 13)) + list(range(14, 26)) and columns["id"] == [d["doc_id"] for d in DOCS]
    errors = [json.loads(line) for line in output.with_name("v.errors.jsonl").read_text().splitlines()]
    assert [{**e, "reason": None} if e["id"] == "empty" else e for e in errors] == ERRORS
    assert errors[1]["reason"].startswith("the text is empty or whitespace only")


def test_on_error_skip_embeds_the_rest_and_lists_the_bad_rows(capsys, checkpoint, embedder, tmp_path):
    bad_corpus(tmp_path / "c.jsonl")
    code, err = embed(capsys, checkpoint, tmp_path / "c.jsonl", tmp_path / "v.npy", "--text-field", "body", "--id-field", "doc_id",
                      "--on-error", "skip")
    assert code == 0, err
    assert f"moee embed: skipped 3 bad row(s) (line 1, line 14, line 27): see {tmp_path}/v.errors.jsonl\n" in err
    check_skipped(tmp_path / "v.npy", embedder)
    provenance = json.loads((tmp_path / "v.npy.json").read_text())["moee_ref.provenance"]
    assert (provenance["input"]["rows"], provenance["input"]["embedded"], provenance["input"]["skipped"]) == (27, 24, 3)


KILL_AFTER_CHUNKS = textwrap.dedent("""
    import os, signal, sys
    from moee_ref.cli import main as cli
    from moee_ref.jobs import corpus

    count, real_write, seen = int(sys.argv[1]), corpus._write_atomic, []

    def write(path, data):
        real_write(path, data)
        if path.name.startswith("chunk-") and path.suffix == ".json":
            seen.append(path)
            if len(seen) == count:
                os.kill(os.getpid(), signal.SIGKILL)

    corpus._write_atomic = write
    sys.exit(cli.main(sys.argv[2:]))
""")


def test_on_error_skip_resumed_after_sigkill_embeds_each_good_row_once(capsys, checkpoint, embedder, tmp_path):
    bad_corpus(tmp_path / "c.jsonl")
    output = tmp_path / "v.npy"
    args = ["embed", "--model", checkpoint, "--input", tmp_path / "c.jsonl", "--output", output, "--dtype", "float32",
            "--batch-size", BATCH, "--no-progress", "--text-field", "body", "--id-field", "doc_id", "--on-error", "skip",
            "--chunk-size", "8"]
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_CHUNKS, "2", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not output.exists() and not output.with_name("v.errors.jsonl").exists()
    code, err = embed(capsys, checkpoint, tmp_path / "c.jsonl", output, "--text-field", "body", "--id-field", "doc_id",
                      "--on-error", "skip", "--chunk-size", "8", "--resume")
    assert code == 0, err
    assert err.startswith(f"moee embed: resuming: 16 of 24 rows are saved in {output}.parts (2 chunks)\n")
    check_skipped(output, embedder)


# ------------------------------------------------------------------ 6, 7, 8. progress, checks before compute, memory


def test_the_progress_bar_moves_per_batch_inside_a_chunk(capsys, monkeypatch, checkpoint, docs, tmp_path):
    updates = []

    class Bar:
        def __init__(self, total, initial):
            self.total = total

        def update(self, n):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(corpus, "_bar", lambda show, total, initial: Bar(total, initial) if show else None)
    monkeypatch.setattr(corpus, "wants_progress", lambda show, count: True)  # a bar for 24 texts
    code = cli.main(["embed", "--model", str(checkpoint), "--input", str(docs), "--text-field", "body", "--output",
                     str(tmp_path / "v.npy"), "--dtype", "float32", "--batch-size", str(BATCH), "--chunk-size", "12"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert updates == [1] * 6  # 24 texts in batches of 4: two chunks of three batches, each batch as it ends
    assert err.splitlines()[-1].startswith(f"embedded 24 texts as moee-sum (128 dims, alpha 1) in float32 -> {tmp_path}/v.npy; ")
    assert err.splitlines()[-1].endswith(" tokens/s") and " texts/s, " in err.splitlines()[-1]


def test_a_standardizer_of_the_wrong_width_is_refused_before_any_compute(capsys, monkeypatch, checkpoint, docs, tmp_path):
    Standardizer.fit(np.random.default_rng(0).random((4, 10)), kind="hs").save(tmp_path / "hs.npz")
    monkeypatch.setattr(MoEEmbedder, "features", lambda *a, **k: pytest.fail("computed before the refusal"))
    code, err = embed(capsys, checkpoint, docs, tmp_path / "v.npy", "--text-field", "body", "--standardizer", tmp_path / "hs.npz")
    assert (code, err) == (1, "moee embed: error: the hs standardizer is 10 wide, this model's HS is 64 wide (with these "
                              "--rw-layers): fit it on this model's features\n")
    assert not (tmp_path / "v.npy.parts").exists()


def test_a_batch_whose_activations_would_not_fit_is_refused_before_it_runs(capsys, monkeypatch, checkpoint, docs, tmp_path):
    from moee_ref.loading import memory

    monkeypatch.setattr(MoEEmbedder, "features", lambda *a, **k: pytest.fail("computed before the refusal"))
    monkeypatch.setattr(memory, "memory_available", lambda limit=None, device=None: (2_000_000, "MemAvailable"))
    code = cli.main(["embed", "--model", str(checkpoint), "--input", str(docs), "--text-field", "body", "--output",
                     str(tmp_path / "v.npy"), "--dtype", "float32", "--batch-size", "2000", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("moee embed: error: --batch-size 2000: the longest batch's activations would take about ")
    assert re.search(r"more than half of the 1\.9 MiB available \(MemAvailable\); use --batch-size [1-9] or less\n$", err), err


def test_an_error_after_the_rows_says_a_way_on_that_works(capsys, monkeypatch, checkpoint, docs, tmp_path):
    from moee_ref.embedding import pipeline
    from moee_ref.errors import InputError

    def fails(*args, **kwargs):
        raise InputError("sim_hs is constant, so its ranking carries no information and alpha is undefined")

    monkeypatch.setattr(pipeline, "finish", fails)
    code, err = embed(capsys, checkpoint, docs, tmp_path / "v.npy", "--text-field", "body")
    parts = tmp_path / "v.npy.parts"
    assert (code, err) == (1, "moee embed: error: sim_hs is constant, so its ranking carries no information and alpha is undefined. "
                              f"Every row is computed and saved in {parts}, but --resume takes only the same options: to change "
                              f"them, remove {parts} and run again\n")
    monkeypatch.undo()
    code, err = embed(capsys, checkpoint, docs, tmp_path / "v.npy", "--text-field", "body", "--resume")  # the way it names works
    assert code == 0, err
