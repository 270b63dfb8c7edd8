"""Which safetensors files a checkpoint directory holds (its index, or its single file), checked: no shard
outside the directory, none missing, and pickle-only weights refused by name."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError, UnsafeCheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index when sharded."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc}); re-download it") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(
                f"{index}: 'weight_map' must map tensor names to shard file names, got {type(weight_map).__name__}; re-download it"
            )
        names = sorted(set(weight_map.values()))
        outside = [n for n in names if not _inside(n)]
        if outside:  # an index is data, and data does not get to choose which files are opened
            raise CheckpointError(
                f"{index}: shard name(s) {', '.join(map(repr, outside))} point outside the checkpoint directory; "
                "shards must be files inside it. Refused: re-download the checkpoint from a source you trust"
            )
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(f"{directory}: shard(s) listed in {INDEX_FILE} are missing: {', '.join(missing)}; download them")
        return [directory / n for n in names]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise UnsafeCheckpointError(
            f"{directory} holds only pickle-based weights ({', '.join(pickled)}). Loading pickle can run arbitrary code, "
            "so moee-ref never does; convert them to safetensors in a trusted environment, or use the safetensors release"
        )
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; the weights must be in safetensors format")


def _inside(name: str) -> bool:
    """A shard name of an index is a relative path below the checkpoint directory: not absolute, no '..'.
    Checked on the name, not the resolved path: hub snapshots are symlinks into a blob store beside them."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts
