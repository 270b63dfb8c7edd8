"""Reading the command line's inputs: texts (plain lines or JSONL) and scored sentence pairs (TSV, CSV, JSONL).

Every error names the file and the line, so a bad row in a large file can be found.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

PAIR_FIELDS = ("sentence1", "sentence2", "score")
PAIR_FORMATS = ("tsv", "csv", "jsonl")


@dataclass
class Pairs:
    first: list[str]
    second: list[str]
    scores: list[float] | None  # None where the file has no score column

    def __len__(self) -> int:
        return len(self.first)


def _read_text(path: str) -> tuple[str, str]:
    """(content, display name); '-' reads standard input."""
    if path == "-":
        if sys.stdin is None or sys.stdin.closed:  # started with standard input closed (`<&-`)
            raise InputError("-: standard input is closed; pipe the texts in, or give a file name instead of -")
        # Bytes decoded as UTF-8 whatever the locale says, as files are; no byte-order mark, universal newlines.
        stream = getattr(sys.stdin, "buffer", None)  # a text stream without one (a test's StringIO) is read as text
        return _decoded(stream.read() if stream is not None else sys.stdin.read().encode("utf-8"), "<stdin>"), "<stdin>"
    file = Path(path)
    if file.is_dir():
        raise InputError(f"{path} is a directory; give the file that holds the input")
    if not file.exists():
        raise InputError(f"{path}: no such file")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror}); check its permissions") from exc
    return _decoded(data, path), path


def _decoded(data: bytes, name: str) -> str:
    """Text from bytes as UTF-8, with universal newlines."""
    try:
        # utf-8-sig: a byte-order mark (as spreadsheet programs write) is not part of the first line.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _lines(content: str) -> list[str]:
    """Lines split at newlines only: str.splitlines() would also split at U+2028, form feeds and the like inside a text."""
    lines = content.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def read_texts(path: str, field: str | None = None) -> list[str]:
    """One text per line; with `field` (or a .jsonl name) each line is a JSON object and field names its text.
    A .csv file (a header line, then rows) or a .parquet file gives the column `field` (default 'text')."""
    suffix = Path(path).suffix.lower() if path != "-" else ""
    if suffix == ".parquet":
        return _parquet_column(path, field or "text")
    content, name = _read_text(path)
    if suffix == ".csv":
        return _csv_column(content, name, field or "text")
    if field is None and name.lower().endswith(".jsonl"):
        field = "text"
    lines = _lines(content)
    if field is None:
        return lines
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _json_line(line, name, number)
        if field not in record:
            raise InputError(f"{name}, line {number}: no field {field!r} (fields: {', '.join(record)})")
        value = record[field]
        if not isinstance(value, str):
            raise InputError(f"{name}, line {number}: field {field!r} is {type(value).__name__}, not a string")
        texts.append(value)
    return texts


def _csv_column(content: str, name: str, column: str) -> list[str]:
    reader = csv.reader(io.StringIO(content))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise InputError(f"{name}: empty file; expected a header line naming the column {column!r}") from None
    except csv.Error as exc:
        raise InputError(f"{name}, line 1: {exc}") from exc
    if column not in header:
        raise InputError(f"{name}, line 1: no column {column!r} (columns: {', '.join(header)}); name the text column with --text-field")
    at, texts = header.index(column), []
    try:
        for values in reader:
            if not values:  # a blank line
                continue
            if len(values) != len(header):
                raise InputError(f"{name}, line {reader.line_num}: {len(values)} fields, the header has {len(header)}")
            texts.append(values[at])
    except csv.Error as exc:
        raise InputError(f"{name}, line {reader.line_num}: {exc}") from exc
    return texts


def _parquet_column(path: str, column: str) -> list[str]:
    from .outputs import require_pyarrow

    require_pyarrow(f"reading {path}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = Path(path)
    if not file.is_file():
        raise InputError(f"{path}: no such file" if not file.exists() else f"{path} is not a file; give the Parquet file that holds the input")
    try:
        schema = pq.read_schema(file)
        if column not in schema.names:
            raise InputError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); name the text column with --text-field")
        if not (pa.types.is_string(schema.field(column).type) or pa.types.is_large_string(schema.field(column).type)):
            raise InputError(f"{path}: column {column!r} holds {schema.field(column).type}, not strings")
        values = pq.read_table(file, columns=[column]).column(column)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from exc
    if values.null_count:
        first = values.is_null().to_pylist().index(True)
        raise InputError(f"{path}: column {column!r} is null at row {first} ({values.null_count} nulls); fill or drop those rows")
    return values.to_pylist()


def read_pairs(path: str, fmt: str | None = None, require_scores: bool = True) -> Pairs:
    """Pairs with gold scores: TSV/CSV with a header naming sentence1, sentence2, score; or JSONL objects with those keys."""
    content, name = _read_text(path)
    fmt = fmt or _format_from_name(name)
    if fmt not in PAIR_FORMATS:
        raise InputError(f"{name}: unknown pair format {fmt!r}; use one of {', '.join(PAIR_FORMATS)} (--format)")
    required = PAIR_FIELDS if require_scores else PAIR_FIELDS[:2]
    rows = _jsonl_rows(content, name) if fmt == "jsonl" else _table_rows(content, name, "\t" if fmt == "tsv" else ",", required)
    pairs = Pairs([], [], [] if require_scores else None)
    has_scores = require_scores
    for number, row in rows:
        for key in ("sentence1", "sentence2"):
            if not isinstance(row.get(key), str):
                raise InputError(f"{name}, line {number}: {key} is missing or not text")
        pairs.first.append(row["sentence1"])
        pairs.second.append(row["sentence2"])
        if has_scores:
            pairs.scores.append(_score(row.get("score"), name, number))
    if not pairs.first:
        raise InputError(f"{name}: no pairs found")
    return pairs


def _format_from_name(name: str) -> str:
    suffix = Path(name).suffix.lower().lstrip(".")
    if suffix in PAIR_FORMATS:
        return suffix
    raise InputError(f"{name}: cannot tell the format from the file name; pass --format {'|'.join(PAIR_FORMATS)}")


def _table_rows(content: str, name: str, delimiter: str, required=PAIR_FIELDS):
    reader = csv.reader(io.StringIO(content), delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{name}: empty file; expected a header line with {', '.join(PAIR_FIELDS)}") from None
    header = [h.strip() for h in header]
    missing = [f for f in required if f not in header]
    if missing:
        raise InputError(f"{name}, line 1: header lacks {', '.join(missing)}; expected columns {', '.join(PAIR_FIELDS)}")
    try:
        for values in reader:
            number = reader.line_num
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise InputError(f"{name}, line {number}: {len(values)} fields, the header has {len(header)}")
            yield number, dict(zip(header, values))
    except csv.Error as exc:
        raise InputError(f"{name}, line {reader.line_num}: {exc}") from exc


def _jsonl_rows(content: str, name: str):
    for number, line in enumerate(_lines(content), start=1):
        if line.strip():
            yield number, _json_line(line, name, number)


def _json_line(line: str, name: str, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{name}, line {number}: not valid JSON ({exc.msg})") from exc
    if not isinstance(record, dict):
        raise InputError(f"{name}, line {number}: expected a JSON object, got {type(record).__name__}")
    return record


def _score(value, name: str, number: int) -> float:
    if value is None or value == "":
        raise InputError(f"{name}, line {number}: score is missing")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}, line {number}: score {value!r} is not a number") from None
    if not math.isfinite(score):
        raise InputError(f"{name}, line {number}: score {value!r} is not finite")
    return score
