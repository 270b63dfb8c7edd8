"""Official-code mode: the embeddings exactly as the authors' public code computes them.

This exists to reproduce published numbers, not as a recommended way to
embed. Point by point, as their public code does it:

1. sentences are preprocessed (a final "." added unless the text ends in
   . ? ! " '; double quotes become single quotes; "" stays "") and put into
   the authors' templates (`none` wraps the sentence in double quotes), then
   underscores become spaces and the prompt is stripped; an instruction
   (official_tasks.py) goes before the sentence, inside the template;
2. batches are taken in input order at their batch size (64 by default, their
   evaluation's --batch_size default; their README runs 128), left padded with
   pad id 0 and the tokenizer's default special tokens, never truncated;
   position ids are 0..T-1 for every row, as transformers uses when none are
   passed, so padding shifts positions;
3. RW is the raw router logits for Qwen1.5-MoE and OLMoE and the softmax
   probabilities for DeepSeekMoE;
4. for rw and moee-concat the whole vector, and for moee-sum both HS and RW,
   are standardised per feature within each batch ((x - mean) / (std + 1e-8),
   sample std); HS alone is not. ensemble="unstandardized" is their
   `--emb_info HS --similarity_ensemble`: moee-sum of the raw HS and RW;
5. NaN becomes zero (so a batch of one text gives zero vectors);
6. similarity (official_similarity) is sklearn's paired cosine, which scores
   two zero vectors 1.0 and a zero vector against another 0.5; moee-sum's is
   cos(HS) + alpha * cos(RW), each part scored so.

Two consequences the default mode avoids: an embedding depends on which
texts share its batch, and on how much padding its row received.
The authors also ran the model in 4-bit NF4 with bf16 compute; that is not
reproduced (no bitsandbytes here), so numbers match up to quantisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .kinds import get_kind, normalize_rows
from .official_tasks import OFFICIAL_BATCH_SIZE, instruction_prefix
from .result import Result, new_report
from .prompts import OFFICIAL_PROMPTS, _lookup_builtin, apply_official_prompt
from .spec import ENSEMBLES, EmbedSpec, FeatureOptions, positive_int
from ..errors import InputError
from ..families import FAMILIES
from ..progress import progress, show_progress
from ..loading.tokenizer import check_texts

OFFICIAL_PAD_ID = 0
# Which router output the authors' code concatenates, by family (each family file says).
OFFICIAL_RW_VALUES = {model_type: family.OFFICIAL_RW for model_type, family in FAMILIES.items() if family.OFFICIAL_RW}
OPTIONS = "kind, prompt, instruction, alpha, ensemble, batch_size, normalize and show_progress_bar"


@dataclass
class OfficialBatches:
    """Raw HS and RW of texts embedded in the authors' batches: rows [starts[i], starts[i+1]) are batch i."""

    hs: np.ndarray
    rw: np.ndarray
    starts: list[int]
    batch_size: int

    def vectors(self, kind: str, alpha: float = 1.0, ensemble: str = "standardized") -> np.ndarray:
        """float32 vectors of `kind`, each batch combined and standardised as their code does, NaN as 0."""
        combine = get_kind(kind).official
        out = np.empty((len(self.hs), get_kind(kind).width(self.hs.shape[1], self.rw.shape[1])), np.float32)
        for start, end in zip(self.starts, self.starts[1:]):
            out[start:end] = combine(self.hs[start:end], self.rw[start:end], alpha, ensemble)
        return np.where(np.isnan(out), np.float32(0.0), out)


def encode_official(
    embedder,
    texts: Sequence[str],
    kind: str = "moee-sum",
    *,
    prompt: str | None = None,
    instruction: str | None = None,
    alpha: float = 1.0,
    ensemble: str = "standardized",
    batch_size: int | None = None,
    normalize: bool = False,
    show_progress_bar: bool | None = None,
    **other_options,
) -> np.ndarray:
    """The vectors the authors' public code gives for `texts` on embedder's (resident) model, float32
    [len(texts), dim] in input order. prompt: one of the authors' prompt names (None: their "none").
    instruction: put before every sentence in their GritLM format (official_tasks.py; None: none).
    ensemble: moee-sum of per-batch standardised HS and RW ("standardized", their `--emb_info MoEE
    --similarity_ensemble`) or of the raw ones ("unstandardized", `--emb_info HS --similarity_ensemble`).
    batch_size: None is OFFICIAL_BATCH_SIZE; the report (embedder.last_report) says which ran."""
    check_official(embedder, kind, prompt, alpha, ensemble, other_options)
    spec = EmbedSpec(kind=kind, prompt=prompt, alpha=alpha, normalize=normalize, mode="official", instruction=instruction,
                     ensemble=ensemble)
    result = run_official(embedder, texts, spec, batch_size=batch_size, show_progress_bar=show_progress_bar)
    embedder.last_report = result.report  # a convenience for the caller; nothing reads it back
    return result.vectors


def run_official(embedder, texts: Sequence[str], spec: EmbedSpec, *, batch_size=None, show_progress_bar=None):
    """pipeline.run's official mode: a Result of the authors' computation for `spec`."""
    batches = official_batches(embedder, texts, spec.kind, prompt=spec.prompt, instruction=spec.instruction, alpha=spec.alpha,
                               ensemble=spec.ensemble, batch_size=batch_size, show_progress_bar=show_progress_bar)
    vectors = batches.vectors(spec.kind, float(spec.alpha), spec.ensemble)
    uses_alpha = get_kind(spec.kind).uses_alpha
    report = new_report(embedder, len(texts), alpha=float(spec.alpha) if uses_alpha else None, batch_size=batches.batch_size)
    return Result(normalize_rows(vectors) if spec.normalize else vectors, report)


def official_batches(embedder, texts: Sequence[str], kind: str = "moee-sum", *, prompt=None, instruction=None, alpha=1.0,
                     ensemble="standardized", batch_size=None, show_progress_bar=None, **other_options) -> OfficialBatches:
    """The raw features behind encode_official, its arguments checked the same way (kind, alpha and ensemble
    only for the checks); for scoring several kinds from one run of the model."""
    name = check_official(embedder, kind, prompt, alpha, ensemble, other_options)
    prefix = instruction_prefix(instruction)
    check_texts(texts)
    batch_size = positive_int("batch_size", OFFICIAL_BATCH_SIZE if batch_size is None else batch_size)
    hs, rw, starts = _features(embedder, texts, name, prefix, batch_size, show_progress_bar)
    return OfficialBatches(hs, rw, starts, batch_size)


def check_official(embedder, kind: str, prompt, alpha, ensemble, other_options=()) -> str:
    """encode_official's checks of its settings (before any text); the prompt's canonical name."""
    if get_kind(kind).official is None:
        EmbedSpec(kind=kind, mode="official").check()  # names the kinds the official mode computes
    family = embedder.args.family
    if family not in OFFICIAL_RW_VALUES:
        raise InputError(
            f"mode='official' reproduces the authors' code, which covers {', '.join(OFFICIAL_RW_VALUES)} only; "
            f"{family} has no official numbers to match: use the default mode"
        )
    if other_options:
        raise InputError(f"mode='official' reproduces the authors' code and takes only {OPTIONS}; drop the other options")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not np.isfinite(alpha) or alpha < 0:
        raise InputError(f"mode='official' takes a fixed numeric alpha >= 0, as the authors' code does; got {alpha!r}")
    if ensemble not in ENSEMBLES:
        raise InputError(f"ensemble={ensemble!r} is not valid; choose one of {', '.join(ENSEMBLES)}")
    name = "none" if prompt is None else prompt
    if not isinstance(name, str) or _lookup_builtin(name, OFFICIAL_PROMPTS) is None:
        raise InputError(
            f"mode='official' takes one of the authors' prompt names ({', '.join(OFFICIAL_PROMPTS)}), got {prompt!r}"
        )
    return name


def _features(embedder, texts, prompt: str, prefix: str, batch_size: int, show_progress_bar):
    args = embedder.args
    options = FeatureOptions(rw_values=OFFICIAL_RW_VALUES[args.family])
    rw_positions = list(range(len(args.moe_layers)))
    hs = np.empty((len(texts), args.hidden_size), np.float32)
    rw = np.empty((len(texts), embedder.dimension("rw")), np.float32)
    starts = list(range(0, len(texts), batch_size)) + [len(texts)]
    prompts = [apply_official_prompt(prompt, text, prefix) for text in texts]
    for start, end in progress(list(zip(starts, starts[1:])), show_progress(show_progress_bar, len(texts)), "embedding", "batch"):
        sequences, _ = embedder.tokenizer.tokenize(prompts[start:end])
        batch = embedder.tokenizer.pad(sequences, padding_side="left")
        input_ids = batch.input_ids.masked_fill(batch.attention_mask == 0, OFFICIAL_PAD_ID)
        if input_ids.shape[1] > args.max_position_embeddings:
            raise InputError(
                f"a prompt of {input_ids.shape[1]} tokens exceeds max_position_embeddings={args.max_position_embeddings}"
            )
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        hs[start:end], rw[start:end] = embedder.run_batch(input_ids, batch.attention_mask, options, rw_positions,
                                                          position_ids=positions)
    return hs, rw, starts  # [0] for no text: no batch


def official_combine(hs: np.ndarray, rw: np.ndarray, kind: str, alpha: float, ensemble: str = "standardized") -> np.ndarray:
    """One batch's vectors with the authors' per-batch standardisation (the kind's `official` in kinds.py)."""
    return get_kind(kind).official(hs, rw, alpha, ensemble)


def official_similarity(a: np.ndarray, b: np.ndarray, kind: str, hidden_size: int, alpha: float = 1.0) -> np.ndarray:
    """Similarity of each row of a with the same row of b as the authors' scorer gives it (float64 [N]).

    Their evaluators use sklearn's 1 - paired_cosine_distances = 1 - |a/|a| - b/|b||^2 / 2 with a zero vector
    left zero: the cosine for non-zero rows, 1.0 for two zero rows, 0.5 for a zero row against another.
    moee-sum (their similarity ensemble) is that score of the HS parts plus alpha times that of the RW parts."""
    if not get_kind(kind).uses_alpha:
        return _paired_cosine(a, b)
    return _paired_cosine(a[:, :hidden_size], b[:, :hidden_size]) + alpha * _paired_cosine(a[:, hidden_size:], b[:, hidden_size:])


def _paired_cosine(a, b) -> np.ndarray:
    a, b = normalize_rows(np.asarray(a, np.float64)), normalize_rows(np.asarray(b, np.float64))
    return 1.0 - 0.5 * ((a - b) ** 2).sum(axis=1)
