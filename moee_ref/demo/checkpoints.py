"""Random checkpoints in the released format, for offline demos, tests and benchmarks.

A checkpoint written here looks like a released one: config.json as the
hub has it (rope_theta at top level), safetensors shards with the
checkpoint's own tensor names and a model.safetensors.index.json, and a
tokenizer. It is written tensor by tensor and shard by shard, so even a
checkpoint with a real model's dimensions never sits whole in memory.
The weights are random: the routing it shows is real computation on
meaningless weights, good for checking the machinery, not for embeddings.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import InputError
from ..families import FAMILIES, name_map_groups, parse_config
from ..families.names import leaves
from ..loading.checkpoint import INDEX_FILE

# Small configs of each family, in the released config.json style (each family file's DEMO_CONFIG). They keep
# every feature of the family switched on (dense first layer, shared experts, q/k norm, biases) so that a
# demo exercises all of it.
SMALL_CONFIGS: dict[str, dict[str, Any]] = {name: family.DEMO_CONFIG for name, family in FAMILIES.items()}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Scaled so activations neither explode nor vanish through the layers."""
    if len(shape) == 1:  # norm weights near one, biases near zero
        base = 0.0 if name.endswith(".bias") else 1.0
        return base + 0.1 * torch.randn(shape, generator=generator)
    std = 1.0 if "embed_tokens" in name else 1.0 / math.sqrt(shape[-1])
    if name.endswith("mlp.gate.weight"):
        std *= 4.0  # a sharper router gives routing that varies visibly between tokens
    return std * torch.randn(shape, generator=generator)


def write_random_checkpoint(
    directory: str | Path,
    config: dict[str, Any],
    *,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_bytes: int = 2**20,
    tokenizer: bool = True,
) -> Path:
    """Write config.json, sharded random safetensors (+ index) and a tokenizer into directory.

    The directory is filled in a temporary sibling and renamed at the end, so
    an interrupted run never leaves a half-written checkpoint behind.
    """
    if dtype not in _DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    args = parse_config(config, "synthetic config")
    directory = Path(directory)
    if directory.exists():
        raise InputError(f"{directory} already exists; choose a new directory or remove it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _write_weights(staging, args, _DTYPES[dtype], seed, max_shard_bytes)
        (staging / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2) + "\n")
        if tokenizer:
            from .tokenizers import build_family_tokenizer

            build_family_tokenizer(FAMILIES[args.family].TOKENIZER_STYLE, args.vocab_size, staging)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _write_weights(directory: Path, args, dtype: torch.dtype, seed: int, max_shard_bytes: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    names = [leaf for group in name_map_groups(args) for recipe in group.values() for leaf in leaves(recipe)]
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    files: list[str] = []

    def flush() -> None:
        nonlocal shard_bytes
        if shards[-1]:
            file = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shards[-1], str(directory / file), metadata={"format": "pt"})
            files.append(file)
            shards[-1] = {}
            shard_bytes = 0

    weight_map: dict[str, int] = {}
    for leaf in names:
        tensor = random_tensor(leaf.name, leaf.shape, generator).to(dtype)
        size = tensor.numel() * tensor.element_size()
        if shard_bytes and shard_bytes + size > max_shard_bytes:
            flush()
        shards[-1][leaf.name] = tensor
        weight_map[leaf.name] = len(files)
        shard_bytes += size
    flush()
    total = sum(leaf_size(leaf.shape) for leaf in names) * torch.tensor([], dtype=dtype).element_size()
    index = {
        "metadata": {"total_size": total},
        "weight_map": {name: files[i] for name, i in sorted(weight_map.items())},
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def leaf_size(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
