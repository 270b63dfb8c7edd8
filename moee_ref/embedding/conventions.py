"""sentence-transformers' conventions on MoEEmbedder.encode: named prompts, output types, precision.

Where the two libraries mean different things, both are accepted: moee-ref's `prompt=` is a built-in
name or a template holding {text}; a sentence-transformers `prompts` mapping holds prefixes ("query: "),
which become the template "query: {text}" (an entry holding {text}, or a built-in name, is kept as it is).
"""

from __future__ import annotations

import difflib
import re

import numpy as np
import torch

from ..errors import InputError
from .prompts import BUILTIN_PROMPTS, PLACEHOLDER, _lookup_builtin

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def check_prompts(prompts, default_prompt_name) -> dict[str, str]:
    prompts = {} if prompts is None else prompts
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise InputError(f"prompts must map names to prompt strings, e.g. {{'query': 'query: '}}; got {prompts!r}")
    for key, value in prompts.items():
        # One bare word is meant as a name (a prefix ends in ': ' or a space): a mistyped name must not become a prefix.
        if re.fullmatch(r"[A-Za-z0-9_-]+", value) and _lookup_builtin(value, BUILTIN_PROMPTS) is None:
            near = difflib.get_close_matches(value.lower(), list(BUILTIN_PROMPTS), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise InputError(f"prompts[{key!r}] is {value!r}: not a built-in prompt name{hint}; a prefix such as "
                             f"'query: ' ends in a space, a template holds {PLACEHOLDER}")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise InputError(f"default_prompt_name {default_prompt_name!r} is not a key of prompts ({', '.join(prompts) or 'none given'})")
    return dict(prompts)


def named_prompt(prompts: dict[str, str], prompt_name: str | None, prompt: str | None, default_prompt_name: str | None):
    """The prompt option encode() runs with: `prompt` as given, or the template of prompts[prompt_name]
    (default_prompt_name when neither is given)."""
    if prompt_name is not None and prompt is not None:
        raise InputError("give prompt or prompt_name, not both")
    name = prompt_name if prompt is None else None
    if name is None and prompt is None:
        name = default_prompt_name
    if name is None:
        return prompt
    if name not in prompts:
        raise InputError(f"prompt_name {name!r} is not in this embedder's prompts ({', '.join(prompts) or 'none set'}); "
                         "pass prompts={...} to MoEEmbedder or from_pretrained")
    value = prompts[name]
    if PLACEHOLDER in value or _lookup_builtin(value, BUILTIN_PROMPTS) is not None:
        return value
    return value + PLACEHOLDER  # a sentence-transformers prefix


def truncated(vectors: np.ndarray, truncate_dim: int | None) -> np.ndarray:
    if truncate_dim is None:
        return vectors
    width = vectors.shape[-1]
    if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int) or not 1 <= truncate_dim <= width:
        raise InputError(f"truncate_dim must be an integer in [1, {width}] (this kind's width), got {truncate_dim!r}")
    return np.ascontiguousarray(vectors[..., :truncate_dim])


def check_precision(precision) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def quantized(vectors: np.ndarray, precision: str) -> np.ndarray:
    """vectors [N, D] as sentence-transformers' quantize_embeddings gives them without calibration data:
    int8/uint8 map each dimension's [min, max] over these rows to 256 steps (so a vector depends on
    the rows it is encoded with); binary/ubinary pack the signs (> 0) into bits, binary shifted by -128."""
    check_precision(precision)
    if precision == "float32":
        return vectors
    if precision in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1)
        return (packed.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else packed
    if len(vectors) < 2:
        raise InputError(f"precision={precision!r} scales each dimension by its range over the rows encoded together; "
                         "encode at least two texts at once")
    low, high = vectors.min(axis=0).astype(np.float32), vectors.max(axis=0).astype(np.float32)
    steps = (high - low) / 255
    steps[steps == 0] = 1.0  # a constant dimension maps to step 0
    levels = np.clip(np.floor((vectors - low) / steps), 0, 255)  # rounding may step past the last level
    return (levels - 128).astype(np.int8) if precision == "int8" else levels.astype(np.uint8)


def converted(vectors: np.ndarray, convert_to_numpy: bool, convert_to_tensor: bool, device=None):
    """sentence-transformers' output types: an array, one tensor, or (convert_to_numpy=False) a list of row tensors."""
    if convert_to_tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(vectors))
        return tensor if device is None else tensor.to(device)
    if not convert_to_numpy:
        rows = torch.from_numpy(np.ascontiguousarray(vectors))
        return list(rows) if rows.dim() == 2 else rows
    return vectors
