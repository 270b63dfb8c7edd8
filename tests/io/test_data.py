"""moee_ref.io.inputs: the command line's readers of texts and scored pairs, called directly.

(Spearman with ties against scipy lives in test_stats.py.)
"""

from __future__ import annotations

import io
import json
import re

import pytest

from moee_ref.io.inputs import Pairs, read_pairs, read_texts
from moee_ref.errors import InputError

HEADER = "sentence1\tsentence2\tscore\n"


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return str(path)


def fails(match: str):
    """pytest.raises(InputError) whose message must contain `match` literally."""
    return pytest.raises(InputError, match=re.escape(match))


# ----------------------------------------------------------------------------- pairs: formats


def test_tsv_csv_and_jsonl_by_suffix_give_the_same_pairs(tmp_path):
    rows = [("A man plays.", "Someone plays.", 4.25), ("Rain.", "Sun.", 0.0), ("Cats sleep.", "A cat naps.", 3.0)]
    tsv = write(tmp_path / "p.tsv", HEADER + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows))
    csv_ = write(tmp_path / "p.csv", "sentence1,sentence2,score\n" + "".join(f"{a},{b},{s}\n" for a, b, s in rows))
    jsonl = write(tmp_path / "p.jsonl", "".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in rows))
    expected = Pairs([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    for path in (tsv, csv_, jsonl):
        pairs = read_pairs(path)
        assert pairs == expected
        assert len(pairs) == 3


def test_suffix_is_case_insensitive(tmp_path):
    path = write(tmp_path / "P.TSV", HEADER + "a\tb\t1\n")
    assert read_pairs(path) == Pairs(["a"], ["b"], [1.0])


def test_unknown_suffix_asks_for_format(tmp_path):
    path = write(tmp_path / "pairs.txt", HEADER + "a\tb\t1\n")
    with fails(f"{path}: cannot tell the format from the file name; pass --format tsv|csv|jsonl"):
        read_pairs(path)


def test_format_override_beats_the_suffix(tmp_path):
    path = write(tmp_path / "pairs.txt", HEADER + "a, with comma\tb\t2.5\n")
    assert read_pairs(path, "tsv") == Pairs(["a, with comma"], ["b"], [2.5])
    # A .csv name holding tab-separated text is read as TSV when told so, and misread as CSV otherwise.
    misnamed = write(tmp_path / "pairs.csv", HEADER + "a, with comma\tb\t2.5\n")
    assert read_pairs(misnamed, "tsv") == Pairs(["a, with comma"], ["b"], [2.5])
    with fails(f"{misnamed}, line 1: header lacks sentence1, sentence2, score"):
        read_pairs(misnamed)


def test_unknown_format_name(tmp_path):
    path = write(tmp_path / "p.tsv", HEADER + "a\tb\t1\n")
    with fails(f"{path}: unknown pair format 'xml'; use one of tsv, csv, jsonl (--format)"):
        read_pairs(path, "xml")


# ----------------------------------------------------------------------------- pairs: headers


def test_header_columns_in_any_order_with_extra_columns_and_spaces(tmp_path):
    path = write(tmp_path / "p.tsv", "id\t score \tsentence2\tsentence1\n7\t1.5\tsecond\tfirst\n")
    assert read_pairs(path) == Pairs(["first"], ["second"], [1.5])


@pytest.mark.parametrize(
    "header, missing",
    [
        ("sentence1\tscore", "sentence2"),
        ("text_a\ttext_b\tscore", "sentence1, sentence2"),
        ("sentence1\tsentence2", "score"),
    ],
)
def test_header_missing_columns_is_reported_on_line_1(tmp_path, header, missing):
    path = write(tmp_path / "p.tsv", header + "\nx\ty\t1\n")
    with fails(f"{path}, line 1: header lacks {missing}; expected columns sentence1, sentence2, score"):
        read_pairs(path)


def test_score_column_is_optional_when_scores_are_not_required(tmp_path):
    path = write(tmp_path / "p.csv", "sentence1,sentence2\na,b\nc,d\n")
    pairs = read_pairs(path, require_scores=False)
    assert pairs == Pairs(["a", "c"], ["b", "d"], None)


def test_empty_file_and_header_only(tmp_path):
    empty = write(tmp_path / "empty.tsv", "")
    with fails(f"{empty}: empty file; expected a header line with sentence1, sentence2, score"):
        read_pairs(empty)
    header_only = write(tmp_path / "header.tsv", HEADER + "\n\n")
    with fails(f"{header_only}: no pairs found"):
        read_pairs(header_only)
    blank_jsonl = write(tmp_path / "blank.jsonl", "\n  \n")
    with fails(f"{blank_jsonl}: no pairs found"):
        read_pairs(blank_jsonl)


# ----------------------------------------------------------------------------- pairs: line numbers


def test_bad_score_names_its_line(tmp_path):
    path = write(tmp_path / "p.tsv", HEADER + "a\tb\t1\nc\td\tfour\n")
    with fails(f"{path}, line 3: score 'four' is not a number"):
        read_pairs(path)


@pytest.mark.parametrize("value, problem", [("", "score is missing"), ("nan", "score 'nan' is not finite"), ("inf", "score 'inf' is not finite")])
def test_missing_and_non_finite_scores(tmp_path, value, problem):
    path = write(tmp_path / "p.csv", f"sentence1,sentence2,score\na,b,1\nc,d,{value}\n")
    with fails(f"{path}, line 3: {problem}"):
        read_pairs(path)


def test_wrong_field_count_names_its_line(tmp_path):
    too_few = write(tmp_path / "few.tsv", HEADER + "a\tb\t1\nc\td\n")
    with fails(f"{too_few}, line 3: 2 fields, the header has 3"):
        read_pairs(too_few)
    too_many = write(tmp_path / "many.csv", "sentence1,sentence2,score\na,b,1\nc,d,1,extra\n")
    with fails(f"{too_many}, line 3: 4 fields, the header has 3"):
        read_pairs(too_many)


def test_empty_lines_are_skipped_but_still_counted(tmp_path):
    path = write(tmp_path / "p.tsv", HEADER + "\na\tb\t1\n\n\t\t\nc\td\t2\n\ne\tf\tbad\n")
    with fails(f"{path}, line 8: score 'bad' is not a number"):
        read_pairs(path)
    good = write(tmp_path / "good.tsv", HEADER + "\na\tb\t1\n\n\t\t\nc\td\t2\n\n")
    assert read_pairs(good) == Pairs(["a", "c"], ["b", "d"], [1.0, 2.0])
    jsonl = write(tmp_path / "p.jsonl", '\n{"sentence1": "a", "sentence2": "b", "score": 1}\n   \n{"sentence1": "c", "sentence2": "d", "score": 2}\n')
    assert read_pairs(jsonl) == Pairs(["a", "c"], ["b", "d"], [1.0, 2.0])


def test_multiline_quoted_csv_field_keeps_physical_line_numbers(tmp_path):
    path = write(tmp_path / "p.csv", 'sentence1,sentence2,score\n"two\nlines",b,1\nc,d,x\n')
    with fails(f"{path}, line 4: score 'x' is not a number"):
        read_pairs(path)


def test_quoted_csv_fields_with_commas_and_quotes(tmp_path):
    path = write(
        tmp_path / "p.csv",
        'sentence1,sentence2,score\n"Hello, world","He said ""hi"", then left",3.5\nplain,"a, b, c",1\n',
    )
    assert read_pairs(path) == Pairs(["Hello, world", "plain"], ['He said "hi", then left', "a, b, c"], [3.5, 1.0])


def test_tsv_quotes_are_literal(tmp_path):
    path = write(tmp_path / "p.tsv", HEADER + 'He said "hi"\t"quoted"\t2\n')
    assert read_pairs(path) == Pairs(['He said "hi"'], ['"quoted"'], [2.0])


def test_jsonl_errors_name_their_line(tmp_path):
    good = json.dumps({"sentence1": "a", "sentence2": "b", "score": 1})
    cases = [
        ("{not json}", "line 2: not valid JSON (Expecting property name enclosed in double quotes)"),
        ('["a", "b", 1]', "line 2: expected a JSON object, got list"),
        ('"just a string"', "line 2: expected a JSON object, got str"),
        ('{"sentence1": "a", "score": 1}', "line 2: sentence2 is missing or not text"),
        ('{"sentence1": 5, "sentence2": "b", "score": 1}', "line 2: sentence1 is missing or not text"),
        ('{"sentence1": "a", "sentence2": "b"}', "line 2: score is missing"),
        ('{"sentence1": "a", "sentence2": "b", "score": "high"}', "line 2: score 'high' is not a number"),
    ]
    for i, (line, message) in enumerate(cases):
        path = write(tmp_path / f"p{i}.jsonl", good + "\n" + line + "\n" + good + "\n")
        with fails(f"{path}, {message}"):
            read_pairs(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes(HEADER.encode() + "café\tb\t1\n".encode("latin-1"))
    with fails(f"{path}: not UTF-8 text (invalid continuation byte at byte 29)"):
        read_pairs(str(path))
    texts = tmp_path / "latin1.txt"
    texts.write_bytes(b"ok\n\xff\n")
    with fails(f"{texts}: not UTF-8 text (invalid start byte at byte 3)"):
        read_texts(str(texts))


def test_byte_order_mark_is_not_part_of_the_header(tmp_path):
    # Spreadsheet programs save "CSV UTF-8" with a byte-order mark.
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfsentence1,sentence2,score\r\na,b,1\r\n")
    assert read_pairs(str(path)) == Pairs(["a"], ["b"], [1.0])
    texts = tmp_path / "bom.txt"
    texts.write_bytes(b"\xef\xbb\xbffirst\r\nsecond\r\n")
    assert read_texts(str(texts)) == ["first", "second"]


def test_missing_file_and_directory(tmp_path):
    with fails(f"{tmp_path / 'nope.tsv'}: no such file"):
        read_pairs(str(tmp_path / "nope.tsv"))
    with fails(f"{tmp_path} is a directory; give the file that holds the input"):
        read_texts(str(tmp_path))


def test_pairs_from_stdin_need_a_format(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(HEADER + "a\tb\t1\n"))
    with fails("<stdin>: cannot tell the format from the file name; pass --format tsv|csv|jsonl"):
        read_pairs("-")
    monkeypatch.setattr("sys.stdin", io.StringIO(HEADER + "a\tb\t1\nc\td\tx\n"))
    with fails("<stdin>, line 3: score 'x' is not a number"):
        read_pairs("-", "tsv")


# ----------------------------------------------------------------------------- texts


def test_texts_one_per_line_keeping_empty_lines(tmp_path):
    path = write(tmp_path / "t.txt", "first line\n\n  indented, kept as is \nlast without newline")
    assert read_texts(path) == ["first line", "", "  indented, kept as is ", "last without newline"]
    assert read_texts(write(tmp_path / "empty.txt", "")) == []


def test_texts_split_only_at_newlines(tmp_path):
    # str.splitlines() would cut these texts at the line separator and the form feed.
    path = write(tmp_path / "t.txt", "a\u2028b\nc\x0cd\ne\x1cf\n")
    assert read_texts(path) == ["a\u2028b", "c\x0cd", "e\x1cf"]
    jsonl = write(tmp_path / "t.jsonl", json.dumps({"text": "x\u2028y"}, ensure_ascii=False) + "\n")
    assert read_texts(jsonl) == ["x\u2028y"]


def test_texts_from_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("one\r\ntwo\r\n\r\nfour\r\n"))
    assert read_texts("-") == ["one", "two", "", "four"]
    monkeypatch.setattr("sys.stdin", io.StringIO('{"body": "a"}\n\n{"body": "b"}\n'))
    assert read_texts("-", "body") == ["a", "b"]


def test_jsonl_texts_use_the_text_field_by_default(tmp_path):
    lines = [{"id": 1, "text": "first"}, {"id": 2, "text": "second", "body": "other"}]
    path = write(tmp_path / "docs.JSONL", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    assert read_texts(path) == ["first", "second"]
    with fails(f"{path}, line 1: no field 'body' (fields: id, text)"):
        read_texts(path, "body")


def test_field_reads_a_file_without_a_known_suffix_as_jsonl(tmp_path):
    path = write(tmp_path / "docs", '{"body": "a"}\n{"body": "b"}\n')
    assert read_texts(path, "body") == ["a", "b"]
    assert read_texts(path) == ['{"body": "a"}', '{"body": "b"}']


def test_jsonl_text_errors_name_their_line(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "ok"}\n{"text": 3}\n')
    with fails(f"{path}, line 2: field 'text' is int, not a string"):
        read_texts(path)
    path = write(tmp_path / "b.jsonl", '{"text": "ok"}\n\n[1, 2]\n')
    with fails(f"{path}, line 3: expected a JSON object, got list"):
        read_texts(path)
    path = write(tmp_path / "c.jsonl", '{"text": "ok"}\n{"text": "unterminated}\n')
    with fails(f"{path}, line 2: not valid JSON (Unterminated string starting at)"):
        read_texts(path)
