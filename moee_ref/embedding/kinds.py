"""The embedding kinds: how HS and RW are read off one decoder output, and how each kind combines them.

RW, from the router to the returned row (the router side is decoder/moe.py `Router.forward`: the softmax
over all experts, float32, zero at padding; decoder/model.py keeps only the pooled position in the last
layer and stacks the layers into `Routing`):

  pool()     takes, per text, the router output of the chosen MoE layers at the pooled position (the
             last real token, or the mean over real tokens) and concatenates the layers: [L_used * E]
  Kind       turns (HS, RW) rows into the kind's vectors; `KINDS` is the registry every front end reads

A new kind is one `register(Kind(...))`: encode(), the pipeline, the corpus jobs, the CLI's --kind and
the evaluations take it from the registry. Section 3 of the paper:

  hs           final normed hidden state at the last real token
  rw           router softmax at the last real token of every MoE layer, concatenated
  moee-concat  [HS; RW]
  moee-sum     [h/|h|; sqrt(alpha) r/|r|]: its dot product is cos(HS) + alpha cos(RW), the paper's
               weighted sum of similarities, as one vector per text
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import InputError
from .standardize import standardize_per_batch


def pool(out, attention_mask: torch.Tensor, hs_layer: str, rw_values: str, pooling: str, rw_positions: list[int]):
    """(HS [B, D], RW [B, L_used * E]) float32 numpy from one batch's decoder output.

    With pooling "last" the decoder was asked for the last real position only (keep_positions), so its
    outputs have one position per row; with "mean" every position, padding weighted 0."""
    with torch.inference_mode():
        if hs_layer == "mean":
            # Mean over the output of every block, the last one taken after the final norm.
            states = list(out.layer_hidden_states[:-1]) + [out.hidden_states]
            hidden = torch.stack(states).float().mean(0)
        else:
            hidden = out.hidden_states.float()
        routing = out.router_probs if rw_values == "probs" else out.router_logits
        routing = routing[:, rw_positions]  # [B, L_used, T or 1, E]: the MoE layers asked for
        if pooling == "last":
            hs, rw = hidden[:, 0], routing[:, :, 0]
        else:
            mask = attention_mask.to(hidden.device, torch.float32)
            weights = mask / mask.sum(-1, keepdim=True)
            hs = torch.einsum("bt,btd->bd", weights, hidden)
            rw = torch.einsum("bt,blte->ble", weights, routing)
        # The layers side by side: layer l's E expert weights are columns [l E, (l + 1) E).
        return hs.cpu().numpy().astype(np.float32), rw.reshape(len(rw), -1).cpu().numpy().astype(np.float32)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length; a zero row stays zero (cosine 0 to everything, never NaN)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


@dataclass(frozen=True)
class Kind:
    """One embedding kind.

    vectors(hs, rw, alpha): the rows of this kind from the HS and RW rows (alpha None unless uses_alpha).
    width(d_hs, d_rw): the width of those rows.
    uses_alpha: the vector is [HS part; sqrt(alpha) RW part] and a pair scores cos(HS) + alpha cos(RW)
    (the evaluations score such kinds part by part, and alpha can be chosen for them).
    official(hs, rw, alpha, ensemble): one batch's vectors as the authors' public code computes them, with its
    per-batch standardisation (embedding/official.py); None for a kind their code does not have.
    parts: how many feature blocks lie side by side in a vector ([HS; RW]: 2); truncate_dim, which keeps the
    first columns, is defined for one-part kinds only (conventions.py `check_truncate_dim`)."""

    name: str
    vectors: Callable[[np.ndarray, np.ndarray, float | None], np.ndarray]
    width: Callable[[int, int], int]
    uses_alpha: bool = False
    official: Callable[[np.ndarray, np.ndarray, float, str], np.ndarray] | None = None
    description: str = ""
    parts: int = 1


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add a kind to the registry (a name already there is refused: unregister it first)."""
    if kind.name in KINDS:
        raise InputError(f"an embedding kind named {kind.name!r} is registered already")
    KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    KINDS.pop(name, None)


def get_kind(name) -> Kind:
    if not isinstance(name, str) or name not in KINDS:
        raise InputError(f"kind={name!r} is not valid; choose one of {', '.join(KINDS)}")
    return KINDS[name]


def combine(hs: np.ndarray, rw: np.ndarray, kind: str, alpha: float | None = None) -> np.ndarray:
    """The vectors of `kind` from the HS and RW rows, float32."""
    spec = get_kind(kind)
    if spec.uses_alpha and alpha is None:
        raise InputError(f"{kind} needs alpha")
    return np.ascontiguousarray(spec.vectors(hs, rw, alpha if spec.uses_alpha else None), dtype=np.float32)


def _sum_of_cosines(hs, rw, alpha):
    return np.concatenate([normalize_rows(hs), np.sqrt(alpha) * normalize_rows(rw)], axis=1)


def _official_sum(hs, rw, alpha, ensemble):
    if ensemble == "unstandardized":  # their --emb_info HS --similarity_ensemble
        return _sum_of_cosines(hs, rw, alpha)
    return _sum_of_cosines(standardize_per_batch(hs), standardize_per_batch(rw), alpha)


register(Kind("hs", lambda hs, rw, alpha: hs, lambda d_hs, d_rw: d_hs,
              official=lambda hs, rw, alpha, ensemble: hs, description="last hidden state"))
register(Kind("rw", lambda hs, rw, alpha: rw, lambda d_hs, d_rw: d_rw,
              official=lambda hs, rw, alpha, ensemble: standardize_per_batch(rw), description="routing weights of every MoE layer"))
register(Kind("moee-concat", lambda hs, rw, alpha: np.concatenate([hs, rw], axis=1), lambda d_hs, d_rw: d_hs + d_rw,
              official=lambda hs, rw, alpha, ensemble: standardize_per_batch(np.concatenate([hs, rw], axis=1)),
              description="[HS; RW]", parts=2))
register(Kind("moee-sum", _sum_of_cosines, lambda d_hs, d_rw: d_hs + d_rw, uses_alpha=True, official=_official_sum,
              description="[h/|h|; sqrt(alpha) r/|r|]: cos(HS) + alpha cos(RW)", parts=2))
