"""Writing results so that an interrupted run never leaves a partial file under the final name."""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError

MISSING_PYARROW = "Parquet files need the optional pyarrow package: pip install pyarrow (in a clone of moee-ref: pip install -e '.[parquet]')"


def require_pyarrow(purpose: str) -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        from ..errors import MissingExtraError

        raise MissingExtraError(f"{purpose}: {MISSING_PYARROW}") from None


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success rename it to `path`, on any failure delete it.

    A file that was already there keeps its permission bits (a private 0600 output stays private);
    a new one gets the mode open() would give it. A symlink is followed: the file it points to is
    replaced and the link stays (check_output_path).
    """
    final = check_output_path(path)
    mode = stat.S_IMODE(final.stat().st_mode) if final.exists() else default_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)  # mkstemp makes it private (0600)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_output_path(path: str | os.PathLike) -> Path:
    """The file to write for `path`, checked before the work, not only after it: the directory exists
    and takes a new file, and what is there (if anything) is a regular file that may be replaced.

    A symlink is followed, as a shell's `>` would: its target is what gets replaced.
    Device nodes, FIFOs and sockets are refused, since renaming a finished file onto one
    would replace the node itself (as root, `--output /dev/null` would replace the system's).
    """
    given = Path(path)
    final = Path(os.path.realpath(given)) if given.is_symlink() else given
    if final.is_dir():
        raise InputError(f"{given} is a directory; give a file name for the output")
    if final.exists() and not final.is_file():
        kind = _node_kind(final.stat().st_mode)
        raise InputError(
            f"{given} is {kind}, not a regular file; outputs are written to a new file and renamed into place, "
            f"which would replace the {kind.split()[-1]} itself: give a regular file's path"
        )
    parent = final.parent
    if not parent.exists():
        raise InputError(f"{parent}: no such directory for the output")
    if not parent.is_dir():
        raise InputError(f"{parent} is a file, not a directory; the output {given} cannot be written inside it")
    try:  # the only sure test (permissions, read-only mounts, quotas, root): make a file there
        fd, probe = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise InputError(
            f"cannot write the output {given}: no new file can be made in {parent} ({exc.strerror}); "
            "choose a directory you can write to"
        ) from exc
    return final


def _node_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def default_file_mode() -> int:
    """The mode open() would give a new file: 0666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


PROVENANCE_KEY = "moee_ref.provenance"  # Parquet key-value metadata; JSONL's first record's key; the sidecar's format


@dataclass
class Table:
    """What an output holds: the vectors and, per row, what travels with them."""

    vectors: np.ndarray
    texts: list[str] | None = None
    rows: list[int] | None = None  # each vector's position among the input's records (default 0..N-1)
    ids: list | None = None
    fields: dict[str, list] = dc_field(default_factory=dict)
    provenance: dict | None = None

    def row_numbers(self) -> list[int]:
        return list(range(len(self.vectors))) if self.rows is None else [int(r) for r in self.rows]

    def columns(self, rows: bool = True) -> dict[str, list]:
        """row, id (where the input had one) and the kept fields, in that order."""
        return {**({"row": self.row_numbers()} if rows else {}), **({"id": self.ids} if self.ids is not None else {}), **self.fields}


@dataclass(frozen=True)
class OutputFormat:
    """One output format: its suffixes, how it is written and how its provenance is read back.
    write(handle, table) writes to a binary file object; provenance lives where the format can hold it."""

    name: str
    suffixes: tuple[str, ...]
    write: Callable
    read_provenance: Callable[[Path], dict | None]
    to_stdout: bool = False  # can stream to standard output (--output -)
    sidecar: bool = False  # provenance in OUT.json beside the output
    needs_pyarrow: bool = False
    needs_texts: bool = False


FORMATS: dict[str, OutputFormat] = {}


def register_format(fmt: OutputFormat) -> OutputFormat:
    FORMATS[fmt.name] = fmt
    return fmt


def errors_path(output) -> Path:
    """Where --on-error skip lists the rows it left out: OUT.errors.jsonl beside the output (v.npy: v.errors.jsonl)."""
    output = Path(output)
    return output.with_name(output.stem + ".errors.jsonl")


def sidecar_path(path) -> Path:
    return Path(str(path) + ".json")


def _write_npy(handle, table: Table) -> None:
    np.save(handle, np.ascontiguousarray(table.vectors, np.float32), allow_pickle=False)


def _write_jsonl(handle, table: Table) -> None:
    """The provenance as the first record ({"moee_ref.provenance": {...}}), then one record a row."""
    if table.provenance is not None:
        handle.write((json.dumps({PROVENANCE_KEY: table.provenance}) + "\n").encode())
    columns = {name: values for name, values in table.columns(rows=False).items()}
    for i, vector in enumerate(table.vectors):  # vectors may be any iterable of rows
        record = {"row": i if table.rows is None else int(table.rows[i]), **{name: values[i] for name, values in columns.items()}}
        if table.texts is not None:
            record["text"] = table.texts[i]
        record["embedding"] = [float(x) for x in vector]
        handle.write((json.dumps(record) + "\n").encode())


def _write_parquet(handle, table: Table) -> None:
    """Columns row, id, the kept fields, text_sha256 (hex) and embedding (a fixed-size list of float32); the
    provenance as the file's key-value metadata."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = np.ascontiguousarray(table.vectors, np.float32)
    data = {name: _arrow_column(pa, values) for name, values in table.columns().items()}
    data["row"] = pa.array(np.asarray(table.row_numbers(), dtype=np.int64))
    data["text_sha256"] = pa.array([hashlib.sha256(t.encode("utf-8")).hexdigest() for t in table.texts], pa.string())
    data["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    arrow = pa.table(data)
    if table.provenance is not None:
        arrow = arrow.replace_schema_metadata({PROVENANCE_KEY: json.dumps(table.provenance)})
    pq.write_table(arrow, handle)


def _arrow_column(pa, values: list):
    """A kept column as Arrow infers it; mixed values (a JSON field of several types) as their JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())


def _npy_provenance(path: Path) -> dict | None:
    side = path if path.suffix == ".json" else sidecar_path(path)
    if not side.is_file():
        return None
    record = json.loads(side.read_text(encoding="utf-8"))
    return record.get(PROVENANCE_KEY) if isinstance(record, dict) else None


def _jsonl_provenance(path: Path) -> dict | None:
    with open(path, encoding="utf-8") as handle:
        first = handle.readline()
    try:
        record = json.loads(first) if first.strip() else None
    except json.JSONDecodeError:
        return None
    return record.get(PROVENANCE_KEY) if isinstance(record, dict) else None


def _parquet_provenance(path: Path) -> dict | None:
    require_pyarrow(f"reading {path}")
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    value = metadata.get(PROVENANCE_KEY.encode())
    return json.loads(value) if value is not None else None


register_format(OutputFormat("npy", (".npy",), _write_npy, _npy_provenance, sidecar=True))
register_format(OutputFormat("jsonl", (".jsonl", ".ndjson"), _write_jsonl, _jsonl_provenance, to_stdout=True))
register_format(OutputFormat("parquet", (".parquet",), _write_parquet, _parquet_provenance, needs_pyarrow=True, needs_texts=True))
OUTPUT_FORMATS = tuple(FORMATS)


def write_embeddings(path: str | os.PathLike, vectors: np.ndarray, fmt: str, texts: list[str] | None = None, *,
                     rows=None, ids=None, fields=None, provenance: dict | None = None) -> None:
    """Write the vectors (and per row: rows, ids, kept fields; the provenance) to `path` in `fmt`; "-" is
    standard output. The file appears, whole, under its name only when complete."""
    if fmt not in FORMATS:
        raise InputError(f"unknown output format {fmt!r}; choose {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    if spec.needs_texts and texts is None:
        raise InputError(f"a {fmt} output holds each text's sha256: pass the texts")
    table = Table(vectors, texts, rows, ids, dict(fields or {}), provenance)
    if str(path) == "-":
        if not spec.to_stdout:
            raise InputError(f"a {fmt} output cannot go to standard output; write a file")
        stream = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else _TextBytes(sys.stdout)
        spec.write(stream, table)
        stream.flush()
        return
    # The sidecar of a format that holds vectors alone: the provenance and, per row, row, id and the kept fields.
    sidecar = sidecar_path(path) if spec.sidecar and (provenance is not None or ids is not None or fields) else None
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            spec.write(handle, table)
        if sidecar is not None:  # before the output appears: an output never lacks its provenance
            with atomic_path(sidecar) as side:
                side.write_text(json.dumps({PROVENANCE_KEY: provenance, "columns": table.columns()}) + "\n", encoding="utf-8")


class _TextBytes:
    """Bytes written to a text stream (a test's StringIO standing in for standard output)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.stream.write(data.decode("utf-8"))

    def flush(self) -> None:
        self.stream.flush()


def read_provenance(path: str | os.PathLike) -> dict:
    """The provenance record an output of moee embed carries, from wherever its format keeps it."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{path}: no such file")
    name = file.name.lower()
    fmt = next((f for f in FORMATS.values() if any(name.endswith(s) for s in f.suffixes)), None)
    if name.endswith(".npy.json"):
        fmt = FORMATS["npy"]
    if fmt is None:
        raise InputError(f"{path}: not an output of moee embed (.npy, .jsonl or .parquet)")
    try:
        record = fmt.read_provenance(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise InputError(f"{path}: its provenance is unreadable ({exc})") from exc
    if record is None:
        where = {"npy": f"no {sidecar_path(file).name} beside it", "jsonl": "its first line is no provenance record",
                 "parquet": "its metadata has no provenance"}[fmt.name]
        raise InputError(f"{path} carries no provenance ({where}): written by another program or an older moee-ref")
    return record


def output_format(path: str, fmt: str | None) -> str:
    """The output's format: its suffix (.npy / .jsonl / .parquet), which --format may repeat but not contradict;
    --format where the name has no known suffix; "-" (standard output) is JSONL.
    Parquet only where pyarrow is installed."""
    from ..errors import UsageError

    if str(path) == "-":
        fmt = fmt or "jsonl"
        if not FORMATS[fmt].to_stdout:
            streams = ", ".join(f.name for f in FORMATS.values() if f.to_stdout)
            raise UsageError(f"--output - streams {streams} to standard output; {fmt} needs a file (its provenance "
                             f"and its layout need a name to live under): give --output FILE")
        return fmt
    name = Path(path).name.lower()
    by_suffix = next((f.name for f in FORMATS.values() if any(name.endswith(s) for s in f.suffixes)), None)
    if by_suffix and fmt and fmt != by_suffix:
        raise UsageError(f"--format {fmt} contradicts the output name {path} (a .{by_suffix} file); "
                         f"drop --format, or name the output for {fmt}")
    fmt = fmt or by_suffix
    if not fmt:
        names = list(FORMATS)
        raise InputError(f"{path}: cannot tell the output format from the name; pass --format {', '.join(names[:-1])} or {names[-1]}")
    if FORMATS[fmt].needs_pyarrow:
        require_pyarrow(f"the output {path}")  # before the work, not after it
    return fmt


def check_not_the_input(output, inputs) -> None:
    """Refuse an output that is one of the inputs (the same file by path, symlink or hard link), and the
    sidecar or parts of an output being one: writing it would destroy what is read."""
    from ..errors import UsageError

    if str(output) == "-":
        return
    targets = [Path(output), sidecar_path(output), errors_path(output)]
    for given in inputs:
        if given is None or str(given) == "-" or not Path(given).exists():
            continue
        for target in targets:
            if target.exists() and os.path.samefile(target, given):
                what = "is" if target == Path(output) else f"would write {target}, which is"
                raise UsageError(f"--output {output} {what} the input {given} (the same file); writing it would destroy "
                                 "the input: choose another output name")
