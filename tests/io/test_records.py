"""Inputs read by what they are (io/inputs.py read_records) and outputs that never harm them (io/outputs.py): the
format from the suffix, --output -, the same file refused, and the provenance every format carries back."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from moee_ref.errors import InputError, UsageError
from moee_ref.io.inputs import read_records, read_texts
from moee_ref.io.outputs import FORMATS, check_not_the_input, output_format, read_provenance, write_embeddings

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None
needs_pyarrow = pytest.mark.skipif(pa is None, reason="needs the parquet extra (pyarrow)")


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_tsv_input_has_a_header_that_is_not_a_text(tmp_path):
    path = write(tmp_path / "c.tsv", "id\ttext\tlang\nd1\tfirst text\ten\nd2\tsecond, with a comma\tde\n")
    records = read_records(path, id_field="id", keep_fields=["lang"])
    assert records.texts == ["first text", "second, with a comma"]
    assert (records.ids, records.fields, records.rows, records.where) == (["d1", "d2"], {"lang": ["en", "de"]}, [0, 1], ["row 1", "row 2"])


def test_a_json_array_is_read_item_by_item(tmp_path):
    assert read_texts(write(tmp_path / "s.json", '["one", "two", "three"]')) == ["one", "two", "three"]
    path = write(tmp_path / "o.json", json.dumps([{"doc_id": 7, "body": "a"}, {"doc_id": 8, "body": "b"}]))
    records = read_records(path, text_field="body", id_field="doc_id")
    assert (records.texts, records.ids) == (["a", "b"], [7, 8])
    with pytest.raises(UsageError, match=r"is an array of strings \(no fields\): --text-field, --id-field and --keep-fields cannot apply"):
        read_records(str(tmp_path / "s.json"), id_field="id")
    with pytest.raises(InputError, match=r"o\.json, row 1: no field 'text' \(fields: doc_id, body\)$"):
        read_texts(path)


@pytest.mark.parametrize("flags, named", [
    (dict(text_field="body"), "--text-field"),
    (dict(id_field="id", keep_fields=["a"]), "--id-field, --keep-fields"),
])
def test_a_flag_that_cannot_apply_to_plain_text_is_a_usage_error_naming_the_format(tmp_path, flags, named):
    path = write(tmp_path / "docs.txt", "one\ntwo\n")
    with pytest.raises(UsageError) as caught:
        read_records(path, **flags)
    assert str(caught.value) == (f"{path} is read as plain text (one text per line, no fields): {named} cannot apply; "
                                 "give a .jsonl, .json, .csv, .tsv or .parquet file")


def test_bad_rows_are_named_as_the_input_counts_them_or_skipped(tmp_path):
    jsonl = write(tmp_path / "c.jsonl", '{"id": 1, "text": "a"}\n\n{"id": 2, "text": 5}\nnot json\n{"id": 4, "text": "d"}\n')
    with pytest.raises(InputError, match=r"^.*c\.jsonl, line 3: field 'text' is int, not a string$"):
        read_records(jsonl, id_field="id")
    records = read_records(jsonl, id_field="id", on_error="skip")
    assert (records.texts, records.ids, records.rows, records.where) == (["a", "d"], [1, 4], [0, 3], ["line 1", "line 5"])
    assert [b.to_json() for b in records.bad] == [
        {"line": 3, "row": 1, "id": 2, "reason": "field 'text' is int, not a string"},
        {"line": 4, "row": 2, "id": None, "reason": "not valid JSON (Expecting value)"},
    ]
    csv = write(tmp_path / "c.csv", "id,text\n1,a\n2\n3,c\n")
    with pytest.raises(InputError, match=r"c\.csv, row 2: 1 fields, the header has 2$"):
        read_records(csv)
    assert read_records(csv, on_error="skip").texts == ["a", "c"]


@needs_pyarrow
def test_parquet_rows_carry_ids_and_fields_and_nulls_are_row_n(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"], "key": ["k1", "k2", "k3"], "n": [1, 2, 3]}), path)
    with pytest.raises(InputError, match=r"in\.parquet, row 2: column 'text' is null$"):
        read_records(str(path))
    records = read_records(str(path), id_field="key", keep_fields=["n"], on_error="skip")
    assert (records.texts, records.ids, records.fields, records.rows) == (["a", "c"], ["k1", "k3"], {"n": [1, 3]}, [0, 2])
    assert records.bad[0].to_json() == {"row": 1, "id": "k2", "reason": "column 'text' is null"}


def test_keep_fields_may_not_repeat_the_text_the_id_or_the_outputs_columns(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"id": 1, "text": "a", "row": 3}\n')
    with pytest.raises(UsageError, match=r"^--keep-fields text, id, row: "):
        read_records(path, id_field="id", keep_fields=["text", "id", "row"])


# ------------------------------------------------------------------ outputs


def test_the_format_follows_the_suffix_and_a_contradicting_one_is_refused():
    assert [output_format(name, None) for name in ("v.npy", "v.jsonl", "-")] == ["npy", "jsonl", "jsonl"]
    assert output_format("v.npy", "npy") == "npy"
    assert output_format("vectors.bin", "npy") == "npy"  # no known suffix: --format says
    with pytest.raises(UsageError) as caught:
        output_format("y.npy", "parquet")
    assert str(caught.value) == "--format parquet contradicts the output name y.npy (a .npy file); drop --format, or name the output for parquet"
    with pytest.raises(UsageError, match=r"^--output - streams jsonl to standard output; npy needs a file"):
        output_format("-", "npy")


def test_an_output_that_is_the_input_is_refused_by_path_symlink_and_hard_link(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n')
    (tmp_path / "link.jsonl").symlink_to(corpus)
    os.link(corpus, tmp_path / "hard.jsonl")
    for output in (corpus, tmp_path / "link.jsonl", tmp_path / "hard.jsonl", tmp_path / "." / "c.jsonl"):
        with pytest.raises(UsageError, match=r"is the input .* \(the same file\); writing it would destroy the input"):
            check_not_the_input(output, [str(corpus)])
    side = tmp_path / "v.npy.json"  # the sidecar of v.npy
    side.write_text("[]")
    with pytest.raises(UsageError, match=r"would write .*v\.npy\.json, which is the input"):
        check_not_the_input(tmp_path / "v.npy", [str(side)])
    check_not_the_input(tmp_path / "other.jsonl", [str(corpus)])  # another file: fine


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_provenance_ids_and_fields_round_trip_in_every_format(tmp_path, fmt):
    if FORMATS[fmt].needs_pyarrow and pa is None:
        pytest.skip("needs pyarrow")
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    provenance = {"format": "moee_ref.provenance", "spec": {"kind": "moee-sum", "alpha": 0.25}, "model": {"name": "m"}}
    path = tmp_path / f"v.{fmt}"
    write_embeddings(path, vectors, fmt, ["a", "b", "c"], rows=[0, 2, 5], ids=["x", "y", "z"], fields={"lang": ["en", "de", "fr"]},
                     provenance=provenance)
    assert read_provenance(path) == provenance
    if fmt == "npy":
        assert np.load(path).tobytes() == vectors.tobytes()
        side = json.loads((tmp_path / "v.npy.json").read_text())
        assert side["columns"] == {"row": [0, 2, 5], "id": ["x", "y", "z"], "lang": ["en", "de", "fr"]}
    elif fmt == "jsonl":
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert lines[0] == {"moee_ref.provenance": provenance}
        assert [{k: r[k] for k in ("row", "id", "lang", "text")} for r in lines[1:]] == [
            {"row": 0, "id": "x", "lang": "en", "text": "a"}, {"row": 2, "id": "y", "lang": "de", "text": "b"},
            {"row": 5, "id": "z", "lang": "fr", "text": "c"}]
    else:
        table = pq.read_table(path)
        assert table.schema.names == ["row", "id", "lang", "text_sha256", "embedding"]
        assert (table.column("row").to_pylist(), table.column("id").to_pylist()) == ([0, 2, 5], ["x", "y", "z"])


def test_reading_provenance_from_a_file_without_it_says_so(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros((1, 2), np.float32))
    with pytest.raises(InputError, match=r"plain\.npy carries no provenance \(no plain\.npy\.json beside it\)"):
        read_provenance(tmp_path / "plain.npy")
