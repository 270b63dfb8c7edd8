"""Official-code mode: the embeddings exactly as the authors' public code computes them.

This exists to reproduce published numbers, not as a recommended way to
embed. Point by point, as their public code does it:

1. sentences are preprocessed (empty -> "."; a final "." added unless the text
   ends in . ? ! " '; double quotes become single quotes) and put into the
   authors' templates (`none` wraps the sentence in double quotes), then
   underscores become spaces and the prompt is stripped;
2. batches are taken in input order at their batch size (256 by default,
   their encode() default), left padded with pad id 0 and the tokenizer's
   default special tokens; position ids are 0..T-1 for every row, as
   transformers uses when none are passed, so padding shifts positions;
3. RW is the raw router logits for Qwen1.5-MoE and OLMoE and the softmax
   probabilities for DeepSeekMoE;
4. for rw and moee-concat the whole vector, and for moee-sum both HS and RW,
   are standardised per feature within each batch ((x - mean) / (std + 1e-8),
   sample std); HS alone is not;
5. NaN becomes zero.

Two consequences the default mode avoids: an embedding depends on which
texts share its batch, and on how much padding its row received.
The authors also ran the model in 4-bit NF4 with bf16 compute; that is not
reproduced (no bitsandbytes here), so numbers match up to quantisation.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .embedding.embedder import EncodeReport, FeatureOptions, check_kind, combine, normalize_rows, positive_int, show_progress
from .embedding.prompts import OFFICIAL_PROMPTS, _lookup_builtin, apply_official_prompt
from .embedding.standardize import standardize_per_batch
from .errors import InputError
from .families import FAMILIES
from .progress import progress
from .tokenizer import check_texts

OFFICIAL_BATCH_SIZE = 256
OFFICIAL_PAD_ID = 0
# Which router output the authors' code concatenates, by family (each family file says).
OFFICIAL_RW_VALUES = {model_type: family.OFFICIAL_RW for model_type, family in FAMILIES.items() if family.OFFICIAL_RW}


def encode_official(
    embedder,
    texts: Sequence[str],
    kind: str = "moee-sum",
    *,
    prompt: str | None = None,
    alpha: float = 1.0,
    batch_size: int | None = None,
    normalize: bool = False,
    show_progress_bar: bool | None = None,
    **other_options,
) -> np.ndarray:
    """The vectors the authors' public code gives for `texts` on embedder's (resident) model, float32
    [len(texts), dim] in input order. prompt: one of the authors' prompt names (None: their "none")."""
    check_kind(kind)
    family = embedder.args.family
    if family not in OFFICIAL_RW_VALUES:
        raise InputError(
            f"mode='official' reproduces the authors' code, which covers {', '.join(OFFICIAL_RW_VALUES)} only; "
            f"{family} has no official numbers to match: use the default mode"
        )
    if other_options:
        raise InputError(
            "mode='official' reproduces the authors' code and takes only kind, prompt, alpha, batch_size, "
            "normalize and show_progress_bar; drop the other options"
        )
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not np.isfinite(alpha) or alpha < 0:
        raise InputError(f"mode='official' takes a fixed numeric alpha >= 0, as the authors' code does; got {alpha!r}")
    name = "none" if prompt is None else prompt
    if not isinstance(name, str) or _lookup_builtin(name, OFFICIAL_PROMPTS) is None:
        raise InputError(
            f"mode='official' takes one of the authors' prompt names ({', '.join(OFFICIAL_PROMPTS)}), got {prompt!r}"
        )
    check_texts(texts)
    batch_size = positive_int("batch_size", OFFICIAL_BATCH_SIZE if batch_size is None else batch_size)
    vectors = _official_vectors(embedder, texts, kind, name, float(alpha), batch_size, show_progress_bar)
    embedder.last_report = EncodeReport(num_texts=len(texts), alpha=float(alpha) if kind == "moee-sum" else None,
                                        dtype=str(embedder.model.dtype).removeprefix("torch."),
                                        dtype_reason=getattr(embedder.model, "dtype_reason", None))
    return normalize_rows(vectors) if normalize else vectors


def _official_vectors(embedder, texts, kind: str, prompt: str, alpha: float, batch_size: int, show_progress_bar) -> np.ndarray:
    args = embedder.args
    options = FeatureOptions(rw_values=OFFICIAL_RW_VALUES[args.family])
    rw_positions = list(range(len(args.moe_layers)))
    width = embedder.dimension(kind)
    if not texts:
        return np.zeros((0, width), np.float32)

    prompts = [apply_official_prompt(prompt, text) for text in texts]
    chunks = [list(range(i, min(i + batch_size, len(texts)))) for i in range(0, len(texts), batch_size)]
    out = np.empty((len(texts), width), np.float32)
    for rows in progress(chunks, show_progress(show_progress_bar, len(texts)), "embedding", "batch"):
        sequences, _ = embedder.tokenizer.tokenize([prompts[i] for i in rows])
        batch = embedder.tokenizer.pad(sequences, padding_side="left")
        input_ids = batch.input_ids.masked_fill(batch.attention_mask == 0, OFFICIAL_PAD_ID)
        if input_ids.shape[1] > args.max_position_embeddings:
            raise InputError(
                f"a prompt of {input_ids.shape[1]} tokens exceeds max_position_embeddings={args.max_position_embeddings}"
            )
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        hs, rw = embedder.run_batch(input_ids, batch.attention_mask, options, rw_positions, position_ids=positions)
        out[rows] = official_combine(hs, rw, kind, alpha)
    return np.where(np.isnan(out), np.float32(0.0), out)


def official_combine(hs: np.ndarray, rw: np.ndarray, kind: str, alpha: float) -> np.ndarray:
    """One batch's vectors with the authors' per-batch standardisation."""
    if kind == "hs":
        return hs
    if kind == "moee-sum":
        return combine(standardize_per_batch(hs), standardize_per_batch(rw), kind, alpha)
    return standardize_per_batch(combine(hs, rw, kind))
