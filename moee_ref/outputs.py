"""Writing results so that an interrupted run never leaves a partial file under the final name."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import InputError

OUTPUT_FORMATS = ("npy", "jsonl")


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success rename it to `path`, on any failure delete it."""
    final = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_file_mode())  # mkstemp makes it private (0600); the output gets a normal file's mode
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_output_path(path: str | os.PathLike) -> Path:
    """The output path, if a file can be written there; checked before the work, not only after it."""
    final = Path(path)
    if final.is_dir():
        raise InputError(f"{final} is a directory; give a file name for the output")
    if not final.parent.exists():
        raise InputError(f"{final.parent}: no such directory for the output")
    return final


def default_file_mode() -> int:
    """The mode open() would give a new file: 0666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_embeddings(path: str | os.PathLike, vectors: np.ndarray, fmt: str, texts: list[str] | None = None) -> None:
    if fmt not in OUTPUT_FORMATS:
        raise InputError(f"unknown output format {fmt!r}; choose {', '.join(OUTPUT_FORMATS)}")
    with atomic_path(path) as tmp:
        if fmt == "npy":
            with open(tmp, "wb") as handle:
                np.save(handle, vectors.astype(np.float32), allow_pickle=False)
        else:
            with open(tmp, "w", encoding="utf-8") as handle:
                for i, vector in enumerate(vectors):
                    record = {"index": i, "embedding": [float(x) for x in vector]}
                    if texts is not None:
                        record["text"] = texts[i]
                    handle.write(json.dumps(record) + "\n")


def output_format(path: str, fmt: str | None) -> str:
    """--format, or the output file's suffix (.npy / .jsonl)."""
    if fmt:
        return fmt
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in OUTPUT_FORMATS:
        return suffix
    raise InputError(f"{path}: cannot tell the output format from the name; pass --format npy or --format jsonl")
