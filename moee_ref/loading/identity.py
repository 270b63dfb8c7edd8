"""What identifies a checkpoint and a fitted standardizer, cheaply: MTEB files results under it
(evaluation/mteb.py) and a corpus job refuses to resume with another (jobs/corpus.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .shards import INDEX_FILE, shard_files

IDENTITY_SAMPLES, IDENTITY_SPAN = 16, 4096  # spans of each shard's data in a local checkpoint's digest


def checkpoint_identity(directory) -> tuple[str, str]:
    """(name, revision) that identify a checkpoint: for a hub snapshot (.../models--owner--name/snapshots/COMMIT)
    owner__name and its commit; for a local directory its folder name and a digest of config.json, the index,
    every shard's header (names, dtypes, shapes, offsets) and IDENTITY_SAMPLES spans of its data, so that two
    checkpoints in folders of the same name (another seed, a fine-tune) are told apart in milliseconds, without
    reading all the weights."""
    directory = Path(directory)
    repo = directory.parent.parent.name
    if directory.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "__"), directory.name

    digest = hashlib.sha256()
    for file in [directory / "config.json", directory / INDEX_FILE]:
        if file.is_file():
            digest.update(file.read_bytes())
    for shard in shard_files(directory):
        with open(shard, "rb") as handle:
            head = handle.read(8)
            digest.update(shard.name.encode() + head + handle.read(int.from_bytes(head, "little")))
            start, size = handle.tell(), os.fstat(handle.fileno()).st_size
            for i in range(IDENTITY_SAMPLES):
                handle.seek(start + (size - start) * i // IDENTITY_SAMPLES)
                digest.update(handle.read(IDENTITY_SPAN))
    return directory.name, "sha256-" + digest.hexdigest()[:16]


def standardizer_digest(standardizer) -> str:
    parts = standardizer if isinstance(standardizer, (list, tuple)) else [standardizer]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(str(part.kind).encode() + np.ascontiguousarray(part.mean).tobytes() + np.ascontiguousarray(part.std).tobytes())
    return digest.hexdigest()[:12]
