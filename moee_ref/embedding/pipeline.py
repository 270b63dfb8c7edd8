"""The one way texts become vectors: run(embedder, texts, spec) -> Result(vectors, report).

Every front end (MoEEmbedder.encode, the command line, the evaluations, corpus jobs, the server) builds an
EmbedSpec (spec.py) and calls this. The default mode computes each text's HS and RW (MoEEmbedder.features:
batches in length order, padding never reaching a real token, so a vector depends only on its text) and
combines them with the kind (kinds.py); the official mode is the authors' own computation (official.py).

Results are returned, never stored on the embedder: one embedder serves concurrent calls.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputError
from .alpha import AlphaChoice, select_alpha_supervised, select_alpha_unsupervised
from .kinds import combine, get_kind, normalize_rows
from .official import run_official
from .result import EncodeReport, Features, Result, new_report  # noqa: F401  (part of the pipeline's API)
from .spec import EmbedSpec, check_standardizers
from .standardize import Standardizer
from .stats import cosine_rows

MAX_AUTO_ALPHA_PAIRS = 20000
# alpha "auto" over the pairs among the texts themselves needs this many distinct texts: with fewer pairs the
# criterion (alpha.py) has so few plateaus that alpha 0 (the smallest of the tied best) wins by default -- 3 texts
# are 3 pairs, whose rankings admit barely any other order, and gave 0.0.
MIN_AUTO_ALPHA_TEXTS = 8


def run(embedder, texts: Sequence[str], spec: EmbedSpec, *, batch_size: int | None = None,
        show_progress_bar: bool | None = None, alpha_pairs=None, alpha_choice: AlphaChoice | None = None) -> Result:
    """Vectors of `spec` for `texts` on the embedder's model.

    alpha_pairs: (texts_a, texts_b), the unlabeled pairs alpha="auto" is chosen over (default: pairs among
    `texts`). alpha_choice: the AlphaChoice behind a numeric alpha, kept in the report."""
    spec.check()
    if spec.official:
        if alpha_pairs is not None:
            raise InputError("the official mode takes a fixed alpha, as the authors' code does; drop alpha_pairs")
        return run_official(embedder, texts, spec, batch_size=batch_size, show_progress_bar=show_progress_bar)
    check_alpha_pairs(spec, alpha_pairs)
    check_auto_alpha_texts(spec, texts, alpha_pairs)  # before any compute
    feats = embedder.features(texts, spec.features, batch_size=batch_size, show_progress_bar=show_progress_bar)
    return finish(embedder, feats, spec, alpha_pairs=alpha_pairs, alpha_choice=alpha_choice, batch_size=batch_size)


def finish(embedder, feats: Features, spec: EmbedSpec, *, alpha_pairs=None, alpha_choice: AlphaChoice | None = None,
           batch_size: int | None = None) -> Result:
    """The default mode's vectors from the features of all the texts (corpus jobs compute those chunk by chunk).
    Row by row, except alpha "auto", which is chosen over the pairs among all the rows (or over alpha_pairs)."""
    kind = get_kind(spec.kind)
    report = new_report(embedder, len(feats.hs), feats.num_truncated)
    if feats.num_truncated:
        report.notes.append(f"{feats.num_truncated} of {len(feats.hs)} texts were truncated to max_length")
    hs, rw = apply_standardizers(feats.hs, feats.rw, spec.standardizers)
    alpha = None
    if kind.uses_alpha:
        if spec.alpha == "auto":
            alpha_choice = choose_auto_alpha(embedder, spec, hs, rw, alpha_pairs, batch_size)
        alpha, report.alpha_choice = alpha_choice.alpha if alpha_choice is not None else float(spec.alpha), alpha_choice
        report.alpha = alpha
    vectors = combine(hs, rw, spec.kind, alpha)
    return Result(normalize_rows(vectors) if spec.normalize else vectors, report)


def check_alpha_pairs(spec: EmbedSpec, alpha_pairs) -> None:
    if alpha_pairs is None:
        return
    if spec.alpha != "auto":
        raise InputError("alpha_pairs are the unlabeled pairs for alpha='auto'; with a fixed alpha drop them")
    if not isinstance(alpha_pairs, (tuple, list)) or len(alpha_pairs) != 2:
        raise InputError("alpha_pairs must be (texts_a, texts_b): two lists of the same length")


def check_auto_alpha_texts(spec: EmbedSpec, texts: Sequence[str], alpha_pairs=None) -> None:
    """alpha "auto" over the texts themselves: refused, before any compute, on fewer distinct texts than it needs."""
    if spec.alpha != "auto" or alpha_pairs is not None or not get_kind(spec.kind).uses_alpha:
        return
    distinct = len(set(texts))
    if distinct < MIN_AUTO_ALPHA_TEXTS:
        same = f" ({len(texts)} texts, {distinct} distinct)" if distinct != len(texts) else ""
        raise InputError(
            f"alpha='auto' needs at least {MIN_AUTO_ALPHA_TEXTS} distinct texts to choose alpha reliably, got {distinct}{same}; "
            "give a number, or choose alpha once on a larger sample (or alpha_pairs) and reuse it (a saved configuration)"
        )


def choose_auto_alpha(embedder, spec: EmbedSpec, hs, rw, alpha_pairs, batch_size) -> AlphaChoice:
    """The label-free alpha of section 3.3: over alpha_pairs, else over pairs among the rows themselves."""
    if alpha_pairs is None:
        return alpha_over_all_pairs(hs, rw)
    a, b = alpha_pairs
    if len(a) != len(b):
        raise InputError(f"texts_a has {len(a)} texts but texts_b has {len(b)}; pairs need equal lengths")
    feats = embedder.features(list(a) + list(b), spec.features, batch_size=batch_size)
    pair_hs, pair_rw = apply_standardizers(feats.hs, feats.rw, spec.standardizers)
    n = len(a)
    return choose_alpha(cosine_rows(pair_hs[:n], pair_hs[n:]), cosine_rows(pair_rw[:n], pair_rw[n:]))


def apply_standardizers(hs, rw, standardizer):
    """Apply fitted Standardizer(s) to their component ("hs" or "rw", by their kind)."""
    if standardizer is None:
        return hs, rw
    items = [standardizer] if isinstance(standardizer, Standardizer) else list(standardizer)
    check_standardizers(items)
    for item in items:
        if item.kind == "hs":
            hs = item.transform(hs)
        else:
            rw = item.transform(rw)
    return hs, rw


def choose_alpha(sim_hs: np.ndarray, sim_rw: np.ndarray, gold=None) -> AlphaChoice:
    if gold is None:
        return select_alpha_unsupervised(sim_hs, sim_rw)
    return select_alpha_supervised(sim_hs, sim_rw, np.asarray(gold, dtype=np.float64))


def alpha_over_all_pairs(hs: np.ndarray, rw: np.ndarray, seed: int = 0) -> AlphaChoice:
    """Label-free alpha over pairs among the texts themselves (all pairs, or a fixed-seed sample of them)."""
    n = len(hs)
    if n < MIN_AUTO_ALPHA_TEXTS:
        raise InputError(f"alpha='auto' needs at least {MIN_AUTO_ALPHA_TEXTS} distinct texts to choose alpha reliably, got {n}")
    first, second = np.triu_indices(n, k=1)
    if len(first) > MAX_AUTO_ALPHA_PAIRS:
        pick = np.random.default_rng(seed).choice(len(first), MAX_AUTO_ALPHA_PAIRS, replace=False)
        first, second = first[np.sort(pick)], second[np.sort(pick)]
    return select_alpha_unsupervised(cosine_rows(hs[first], hs[second]), cosine_rows(rw[first], rw[second]))
