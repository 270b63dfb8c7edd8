"""Writing results so that an interrupted run never leaves a partial file under the final name."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import InputError

OUTPUT_FORMATS = ("npy", "jsonl", "parquet")
MISSING_PYARROW = "Parquet files need the optional pyarrow package: pip install 'moee-ref[parquet]'"


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


def write_embeddings(path: str | os.PathLike, vectors: np.ndarray, fmt: str, texts: list[str] | None = None) -> None:
    if fmt not in OUTPUT_FORMATS:
        raise InputError(f"unknown output format {fmt!r}; choose {', '.join(OUTPUT_FORMATS)}")
    if fmt == "parquet" and texts is None:
        raise InputError("a Parquet output holds each text's sha256: pass the texts")
    with atomic_path(path) as tmp:
        if fmt == "npy":
            with open(tmp, "wb") as handle:
                np.save(handle, vectors.astype(np.float32), allow_pickle=False)
        elif fmt == "parquet":
            _write_parquet(tmp, vectors, texts)
        else:
            with open(tmp, "w", encoding="utf-8") as handle:
                for i, vector in enumerate(vectors):
                    record = {"index": i, "embedding": [float(x) for x in vector]}
                    if texts is not None:
                        record["text"] = texts[i]
                    handle.write(json.dumps(record) + "\n")


def _write_parquet(path: Path, vectors: np.ndarray, texts: list[str]) -> None:
    """Columns id (the row's index in the input), text_sha256 (hex) and embedding (a fixed-size list of float32)."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = np.ascontiguousarray(vectors, np.float32)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    table = pa.table({
        "id": pa.array(np.arange(len(vectors), dtype=np.int64)),
        "text_sha256": pa.array([hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts], pa.string()),
        "embedding": embedding,
    })
    pq.write_table(table, path)


def output_format(path: str, fmt: str | None) -> str:
    """--format, or the output file's suffix (.npy / .jsonl / .parquet); parquet only where pyarrow is installed."""
    if not fmt:
        fmt = Path(path).suffix.lower().lstrip(".")
        if fmt not in OUTPUT_FORMATS:
            raise InputError(f"{path}: cannot tell the output format from the name; pass --format npy, jsonl or parquet")
    if fmt == "parquet":
        require_pyarrow(f"the output {path}")  # before the work, not after it
    return fmt
