"""Reading the command line's inputs: texts (plain lines or JSONL) and scored sentence pairs (TSV, CSV, JSONL).

Every error names the file and the line, so a bad row in a large file can be found.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
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


TEXT_FORMATS = ("text", "jsonl", "json", "csv", "tsv", "parquet")
SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
            ".tsv": "tsv", ".parquet": "parquet"}


@dataclass
class BadRow:
    """An input row that was not embedded (--on-error skip): where the input has it, its id, and why."""

    where: str  # as the input counts it: "line N" (text, JSONL) or "row N" (CSV, TSV, JSON, Parquet), from 1
    row: int  # its position among the input's records, from 0 (the outputs' `row`)
    id: object
    reason: str

    def to_json(self) -> dict:
        return {self.where.split()[0]: int(self.where.split()[1]), "row": self.row, "id": self.id, "reason": self.reason}


@dataclass
class Records:
    """The texts of an input and what travels with them to the output."""

    name: str  # the file as given, or <stdin>
    format: str  # one of TEXT_FORMATS
    texts: list[str]
    rows: list[int]  # each text's position among the input's records, from 0
    where: list[str]  # each text's place as the input counts it ("line 3", "row 3")
    ids: list | None = None  # --id-field's values
    fields: dict[str, list] = field(default_factory=dict)  # --keep-fields' values
    bad: list[BadRow] = field(default_factory=list)  # rows skipped (on_error="skip")

    def keep(self, positions) -> "Records":
        """These records only (positions into texts), the bad ones kept."""
        positions = list(positions)
        return Records(self.name, self.format, [self.texts[i] for i in positions], [self.rows[i] for i in positions],
                       [self.where[i] for i in positions], None if self.ids is None else [self.ids[i] for i in positions],
                       {k: [v[i] for i in positions] for k, v in self.fields.items()}, list(self.bad))


def input_format(path: str, structured: bool = False) -> str:
    """The input's format from its name; standard input or an unknown suffix: JSONL where a field is named
    (structured), else one text per line."""
    if path != "-":
        found = SUFFIXES.get(Path(path).suffix.lower())
        if found:
            return found
    return "jsonl" if structured else "text"


def read_texts(path: str, field: str | None = None) -> list[str]:
    """One text per line; with `field` (or a .jsonl name) each line is a JSON object and field names its text.
    A .csv/.tsv file (a header line, then rows), a .json array or a .parquet file gives the column `field`."""
    return read_records(path, text_field=field).texts


def read_records(path: str, *, text_field: str | None = None, id_field: str | None = None, keep_fields=(),
                 on_error: str = "fail") -> Records:
    """The texts of `path` read by what it is (input_format), with the id and kept fields of every row.

    on_error "fail": the first bad row raises InputError naming it as the input counts it; "skip": bad rows are
    left out and listed in Records.bad. A flag that cannot apply to the format is a UsageError naming it."""
    from ..errors import UsageError

    keep_fields = list(keep_fields or ())
    fmt = input_format(path, bool(text_field or id_field or keep_fields))
    if fmt == "text":
        given = [flag for flag, value in (("--text-field", text_field), ("--id-field", id_field),
                                          ("--keep-fields", keep_fields)) if value]
        if given:
            raise UsageError(f"{path} is read as plain text (one text per line, no fields): {', '.join(given)} cannot apply; "
                             "give a .jsonl, .json, .csv, .tsv or .parquet file")
    clash = [name for name in keep_fields if name in (text_field or "text", id_field) or name in RESERVED]
    if clash:
        raise UsageError(f"--keep-fields {', '.join(clash)}: the text, the id and the output's own columns "
                         f"({', '.join(RESERVED)}) are not kept twice")
    reader = _Reader(path, fmt, text_field or "text", id_field, keep_fields, on_error)
    if fmt == "parquet":
        reader.parquet()
    else:
        content, reader.records.name = _read_text(path)
        {"text": reader.lines, "jsonl": reader.jsonl, "json": reader.json, "csv": reader.table, "tsv": reader.table}[fmt](content)
    return reader.records


RESERVED = ("row", "text", "embedding")


class _Reader:
    def __init__(self, path, fmt, text_field, id_field, keep_fields, on_error):
        if on_error not in ("fail", "skip"):
            raise InputError(f"on_error={on_error!r} is not valid; choose 'fail' or 'skip'")
        self.path, self.text_field, self.id_field, self.keep_fields, self.on_error = path, text_field, id_field, keep_fields, on_error
        self.records = Records(path, fmt, [], [], [], [] if id_field else None, {k: [] for k in keep_fields})
        self.count = 0  # records seen, good and bad

    def bad(self, where: str, reason: str, id_value=None) -> None:
        if self.on_error == "fail":
            raise InputError(f"{self.records.name}, {where}: {reason}")
        self.records.bad.append(BadRow(where, self.count, id_value, reason))
        self.count += 1

    def add(self, where: str, record: dict) -> None:
        """One record (a dict of its fields): its text, id and kept fields, or a bad row."""
        id_value = record.get(self.id_field) if self.id_field else None
        if self.text_field not in record:
            return self.bad(where, f"no field {self.text_field!r} (fields: {', '.join(record)})", id_value)
        text = record[self.text_field]
        if not isinstance(text, str):
            return self.bad(where, f"field {self.text_field!r} is {type(text).__name__}, not a string", id_value)
        if self.id_field and self.id_field not in record:
            return self.bad(where, f"no id field {self.id_field!r} (fields: {', '.join(record)})")
        missing = [k for k in self.keep_fields if k not in record]
        if missing:
            return self.bad(where, f"no field {', '.join(map(repr, missing))} to keep (fields: {', '.join(record)})", id_value)
        self.plain(where, text)
        if self.id_field:
            self.records.ids.append(id_value)
        for name in self.keep_fields:
            self.records.fields[name].append(record[name])

    def plain(self, where: str, text: str) -> None:
        self.records.texts.append(text)
        self.records.rows.append(self.count)
        self.records.where.append(where)
        self.count += 1

    def lines(self, content: str) -> None:
        for number, line in enumerate(_lines(content), start=1):
            self.plain(f"line {number}", line)

    def jsonl(self, content: str) -> None:
        for number, line in enumerate(_lines(content), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                self.bad(f"line {number}", f"not valid JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                self.bad(f"line {number}", f"expected a JSON object, got {type(record).__name__}")
                continue
            self.add(f"line {number}", record)

    def json(self, content: str) -> None:
        try:
            items = json.loads(content)
        except json.JSONDecodeError as exc:
            raise InputError(f"{self.records.name}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                             "a .json input is one array of strings or of objects (one object a line: name it .jsonl)") from None
        if not isinstance(items, list):
            raise InputError(f"{self.records.name}: a .json input is an array of strings or of objects, not a {type(items).__name__}")
        strings = bool(items) and isinstance(items[0], str)
        if strings and (self.id_field or self.keep_fields or self.text_field != "text"):
            from ..errors import UsageError

            raise UsageError(f"{self.records.name} is an array of strings (no fields): --text-field, --id-field and "
                             "--keep-fields cannot apply")
        for number, item in enumerate(items, start=1):
            if strings:
                if isinstance(item, str):
                    self.plain(f"row {number}", item)
                else:
                    self.bad(f"row {number}", f"expected a string like the first row, got {type(item).__name__}")
            elif isinstance(item, dict):
                self.add(f"row {number}", item)
            else:
                self.bad(f"row {number}", f"expected a JSON object like the first row, got {type(item).__name__}")

    def table(self, content: str) -> None:
        tsv = self.records.format == "tsv"
        reader = csv.reader(io.StringIO(content), delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        name = self.records.name
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise InputError(f"{name}: empty file; expected a header line naming the column {self.text_field!r}") from None
        except csv.Error as exc:
            raise InputError(f"{name}, line 1: {exc}") from exc
        wanted = [self.text_field, *([self.id_field] if self.id_field else []), *self.keep_fields]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise InputError(f"{name}, line 1 (the header): no column {', '.join(map(repr, missing))} (columns: {', '.join(header)}); "
                             "name the text column with --text-field")
        number = 0
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise InputError(f"{name}, row {number + 1}: {exc}") from exc
            if not values:  # a blank line
                continue
            number += 1
            if len(values) != len(header):
                self.bad(f"row {number}", f"{len(values)} fields, the header has {len(header)}")
                continue
            self.add(f"row {number}", dict(zip(header, values)))

    def parquet(self) -> None:
        from .outputs import require_pyarrow

        path = self.path
        require_pyarrow(f"reading {path}")
        import pyarrow as pa
        import pyarrow.parquet as pq

        file = Path(path)
        if not file.is_file():
            raise InputError(f"{path}: no such file" if not file.exists() else f"{path} is not a file; give the Parquet file that holds the input")
        wanted = [self.text_field, *([self.id_field] if self.id_field else []), *self.keep_fields]
        try:
            schema = pq.read_schema(file)
            missing = [c for c in wanted if c not in schema.names]
            if missing:
                raise InputError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(schema.names)}); "
                                 "name the text column with --text-field")
            kind = schema.field(self.text_field).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise InputError(f"{path}: column {self.text_field!r} holds {kind}, not strings")
            table = pq.read_table(file, columns=list(dict.fromkeys(wanted)))
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: not a readable Parquet file ({exc})") from exc
        columns = {c: table.column(c).to_pylist() for c in dict.fromkeys(wanted)}
        for number in range(table.num_rows):
            record = {c: values[number] for c, values in columns.items()}
            if record[self.text_field] is None:
                self.bad(f"row {number + 1}", f"column {self.text_field!r} is null",
                         record.get(self.id_field) if self.id_field else None)
                continue
            self.add(f"row {number + 1}", record)


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
