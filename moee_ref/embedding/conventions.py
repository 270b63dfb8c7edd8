"""sentence-transformers' conventions on MoEEmbedder.encode: prompts, output types, precision, similarity.

Where the two libraries mean different things, both are accepted: moee-ref's prompt is a built-in name or a
template holding {text}; sentence-transformers' prompts are prefixes ("query: "), which become the template
"query: {text}". That holds for `prompt=` and for the entries of a `prompts` mapping alike; one bare word that
is no built-in name is refused as a mistyped name, never taken as a prefix.
"""

from __future__ import annotations

import difflib
import re

import numpy as np
import torch

from ..errors import InputError
from .prompts import BUILTIN_PROMPTS, PLACEHOLDER, _lookup_builtin

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
# sentence-transformers' similarity functions (its SimilarityFunction values): euclidean and manhattan are the
# negative distances, so that a larger score is more similar everywhere.
SIMILARITY_FNS = ("cosine", "dot", "euclidean", "manhattan")


def as_template(prompt):
    """A prompt option as a template: a built-in name or a template is kept, a prefix ("query: ", also "")
    becomes prefix + {text}. One bare word that is no built-in name stays as it is, for resolve_prompt to
    refuse as an unknown name (a mistyped name must not become a prefix)."""
    if not isinstance(prompt, str) or PLACEHOLDER in prompt or _lookup_builtin(prompt, BUILTIN_PROMPTS) is not None:
        return prompt
    if re.fullmatch(r"[A-Za-z0-9_-]+", prompt):
        return prompt
    return prompt + PLACEHOLDER


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
        return as_template(prompt)
    if name not in prompts:
        raise InputError(f"prompt_name {name!r} is not in this embedder's prompts ({', '.join(prompts) or 'none set'}); "
                         "pass prompts={...} to MoEEmbedder or from_pretrained")
    return as_template(prompts[name])


def check_truncate_dim(truncate_dim, kind, width: int) -> None:
    """truncate_dim keeps the first d columns (Matryoshka style): defined for one-part kinds (hs, rw). A kind of
    several parts side by side ([HS; RW]) is refused below its full width: the cut would keep HS and drop RW."""
    if truncate_dim is None:
        return
    if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int) or not 1 <= truncate_dim <= width:
        raise InputError(f"truncate_dim must be an integer in [1, {width}] (this kind's width), got {truncate_dim!r}")
    if kind.parts > 1 and truncate_dim < width:
        raise InputError(
            f"truncate_dim={truncate_dim} is refused for kind {kind.name!r}: its vectors are [HS; RW] side by side, so "
            f"keeping the first {truncate_dim} of {width} columns drops the routing weights (all or part of them) and "
            "changes what the similarity measures; truncate kind 'hs' or 'rw', or make moee vectors narrower with "
            "rw_layers= (fewer MoE layers)"
        )


def truncated(vectors: np.ndarray, truncate_dim: int | None) -> np.ndarray:
    if truncate_dim is None:
        return vectors
    return np.ascontiguousarray(vectors[..., :truncate_dim])


def check_precision(precision) -> str:
    """The precision, None read as float32 (sentence-transformers passes None for no quantisation)."""
    if precision is None:
        return "float32"
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)} (or None: float32), got {precision!r}")
    return precision


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


def check_similarity_fn_name(name) -> str:
    """One of SIMILARITY_FNS (sentence-transformers' SimilarityFunction members are taken by their value)."""
    value = getattr(name, "value", name)
    if value not in SIMILARITY_FNS:
        raise InputError(f"similarity_fn_name must be one of {', '.join(SIMILARITY_FNS)}, got {name!r}")
    return value


def _rows(x) -> np.ndarray:
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.atleast_2d(array.astype(np.float64))


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _as_input(scores: np.ndarray, a, b):
    """float32 scores, a tensor (on a's device) when either input is a tensor, else numpy."""
    scores = scores.astype(np.float32)
    tensor = next((x for x in (a, b) if isinstance(x, torch.Tensor)), None)
    return torch.from_numpy(scores).to(tensor.device) if tensor is not None else scores


def similarity_matrix(a, b, name: str):
    """[len(a), len(b)] scores of `name` as sentence-transformers computes them (cosine of a zero vector: 0),
    in float64, returned float32; tensors in, a tensor out."""
    x, y = _rows(a), _rows(b)
    if x.shape[1] != y.shape[1]:
        raise InputError(f"cannot compare embeddings of width {x.shape[1]} and {y.shape[1]}")
    if name == "cosine":
        scores = _unit(x) @ _unit(y).T
    elif name == "dot":
        scores = x @ y.T
    elif name == "euclidean":
        squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * (x @ y.T)
        scores = -np.sqrt(np.maximum(squared, 0))
    else:
        step = max(1, 2**24 // max(1, len(y) * x.shape[1]))  # rows of a per chunk: about 128 MiB of differences
        scores = np.concatenate([-np.abs(x[i : i + step, None] - y[None]).sum(-1) for i in range(0, len(x), step)]
                                or [np.zeros((0, len(y)))])
    return _as_input(scores, a, b)


def similarity_rows(a, b, name: str):
    """[N] scores of `name` of each row of a with the same row of b; tensors in, a tensor out."""
    x, y = _rows(a), _rows(b)
    if x.shape != y.shape:
        raise InputError(f"pairwise similarity needs embeddings of the same shape, got {x.shape} and {y.shape}")
    if name == "cosine":
        scores = (_unit(x) * _unit(y)).sum(1)
    elif name == "dot":
        scores = (x * y).sum(1)
    elif name == "euclidean":
        scores = -np.sqrt(((x - y) ** 2).sum(1))
    else:
        scores = -np.abs(x - y).sum(1)
    return _as_input(scores, a, b)
