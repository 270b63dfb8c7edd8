"""Choosing alpha for MoEE (sum): sim_final = sim_HS + alpha * sim_RW.

Section 3.3 of the paper tunes alpha "using a gradient-based approach to
maximize the Spearman rank correlation between sim_final and its components
(sim_HS and sim_RW)", without labels. The authors' public code does not
contain this step (it takes alpha from the command line), so the criterion is
made precise here:

    unsupervised:  maximise  spearman(s, s_HS) + spearman(s, s_RW)
    supervised:    maximise  spearman(s, gold)
    where          s = s_HS + alpha * s_RW,  alpha in [0, ALPHA_MAX].

Why a scalar search instead of gradients: Spearman depends on s only through
its ranking, which changes only where two pairs swap order, so the criterion
is piecewise constant in alpha and has no useful gradient. It is also scale
invariant -- only the direction (1, alpha) matters -- so a log-spaced grid
covers it evenly. Note that alpha = 0 and alpha -> infinity give the same
unsupervised score, 1 + spearman(s_HS, s_RW); the optimum lies in between
whenever mixing helps.

Search: alpha = 0 plus a log-spaced coarse grid over [ALPHA_MIN_POSITIVE,
ALPHA_MAX], then a few rounds of a finer grid between the neighbours of the
best point so far. Among equal scores the smallest alpha wins, which makes the
result deterministic and, on a plateau, its lower edge. Near its top the
criterion is a cluster of narrow plateaus, so the very best one can be missed;
the loss is of the order of their differences (~1e-5 for a few hundred pairs),
far below the noise of the criterion itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError
from .stats import pearson, rankdata

ALPHA_MAX = 1e3
ALPHA_MIN_POSITIVE = 1e-3
COARSE_POINTS = 241  # 40 per decade over 1e-3..1e3: neighbours ~6% apart
REFINE_POINTS = 101
REFINE_ROUNDS = 2
MIN_PAIRS = 3

UNSUPERVISED_CRITERION = "spearman(s, s_hs) + spearman(s, s_rw), s = s_hs + alpha * s_rw"
SUPERVISED_CRITERION = "spearman(s, gold), s = s_hs + alpha * s_rw"


@dataclass(frozen=True)
class AlphaChoice:
    """The chosen alpha, the criterion's value there, and what was maximised."""

    alpha: float
    score: float
    criterion: str


def select_alpha_unsupervised(sim_hs, sim_rw, grid: Sequence[float] | None = None) -> AlphaChoice:
    """Choose alpha without labels (the paper's section 3.3, made precise).

    Maximises ``spearman(s, sim_hs) + spearman(s, sim_rw)`` with
    ``s = sim_hs + alpha * sim_rw`` over alpha in ``[0, ALPHA_MAX]``: the
    combined score should keep as much of the ranking of each component as
    possible. The score lies in [-2, 2].

    ``grid``: optional explicit candidate alphas (non-negative); when given,
    exactly these are tried, with no refinement.
    """
    hs, rw = _validate_pairs(sim_hs=sim_hs, sim_rw=sim_rw)
    hs_ranks, rw_ranks = rankdata(hs), rankdata(rw)

    def complementarity(alpha: float) -> float:
        combined_ranks = rankdata(hs + alpha * rw)
        return pearson(combined_ranks, hs_ranks) + pearson(combined_ranks, rw_ranks)

    alpha, score = _maximise(complementarity, grid)
    return AlphaChoice(alpha=alpha, score=score, criterion=UNSUPERVISED_CRITERION)


def select_alpha_supervised(sim_hs, sim_rw, gold, grid: Sequence[float] | None = None) -> AlphaChoice:
    """Choose alpha with labels: maximise ``spearman(sim_hs + alpha * sim_rw, gold)``.

    Same search and ``grid`` semantics as ``select_alpha_unsupervised``. Use it
    on a development split; tuning on the test labels inflates results.
    """
    hs, rw, gold_scores = _validate_pairs(sim_hs=sim_hs, sim_rw=sim_rw, gold=gold)
    gold_ranks = rankdata(gold_scores)

    def agreement(alpha: float) -> float:
        return pearson(rankdata(hs + alpha * rw), gold_ranks)

    alpha, score = _maximise(agreement, grid)
    return AlphaChoice(alpha=alpha, score=score, criterion=SUPERVISED_CRITERION)


# --- input checks ---------------------------------------------------------


def _validate_scores(values, name: str) -> np.ndarray:
    """Check one array of per-pair scores is 1-D, long enough, finite and not constant."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise InputError(f"{name} must be a 1-D array of per-pair scores, got shape {array.shape}")
    if array.size < MIN_PAIRS:
        raise InputError(f"{name} has {array.size} pairs; choosing alpha needs at least {MIN_PAIRS}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} contains NaN or infinite values; fix the similarities first")
    if np.all(array == array[0]):
        raise InputError(f"{name} is constant, so its ranking carries no information and alpha is undefined")
    return array


def _validate_pairs(**named_values) -> tuple[np.ndarray, ...]:
    """Validate each named array and check they all describe the same pairs."""
    arrays = {name: _validate_scores(values, name) for name, values in named_values.items()}
    lengths = {name: array.size for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name} has {length}" for name, length in lengths.items())
        raise InputError(f"all inputs must score the same pairs, but {described}")
    return tuple(arrays.values())


def _validate_grid(grid: Sequence[float]) -> np.ndarray:
    alphas = np.asarray(grid, dtype=np.float64)
    if alphas.ndim != 1 or alphas.size == 0:
        raise InputError(f"grid must be a non-empty 1-D sequence of alphas, got shape {alphas.shape}")
    if not np.all(np.isfinite(alphas)) or np.any(alphas < 0):
        raise InputError("grid alphas must be finite and >= 0 (a negative alpha would reward disagreeing with RW)")
    return alphas


# --- the scalar search ----------------------------------------------------


def _maximise(score_of: Callable[[float], float], grid: Sequence[float] | None) -> tuple[float, float]:
    """Return (alpha, score) maximising score_of; ties go to the smallest alpha."""
    scores: dict[float, float] = {}

    def evaluate(alphas) -> None:
        for alpha in alphas:
            alpha = float(alpha)
            if alpha not in scores:
                scores[alpha] = score_of(alpha)

    if grid is not None:
        evaluate(_validate_grid(grid))
        return _best(scores)

    evaluate(_coarse_grid())
    for _ in range(REFINE_ROUNDS):
        best_alpha, _ = _best(scores)
        low, high = _neighbours(best_alpha, sorted(scores))
        evaluate(_grid_between(low, high))
    return _best(scores)


def _coarse_grid() -> np.ndarray:
    positive = np.geomspace(ALPHA_MIN_POSITIVE, ALPHA_MAX, COARSE_POINTS)
    return np.concatenate(([0.0], positive))


def _best(scores: dict[float, float]) -> tuple[float, float]:
    # A NaN score (the combination happened to be constant) never wins.
    finite = [(alpha, score) for alpha, score in scores.items() if not math.isnan(score)]
    if not finite:
        raise InputError("no candidate alpha gives a defined Spearman correlation; check the similarities")
    best_score = max(score for _, score in finite)
    best_alpha = min(alpha for alpha, score in finite if score == best_score)
    return best_alpha, best_score


def _neighbours(alpha: float, sorted_alphas: list[float]) -> tuple[float, float]:
    index = sorted_alphas.index(alpha)
    low = sorted_alphas[max(index - 1, 0)]
    high = sorted_alphas[min(index + 1, len(sorted_alphas) - 1)]
    return low, high


def _grid_between(low: float, high: float) -> np.ndarray:
    # Log spacing matches the scale invariance; it cannot start at 0.
    if low == 0.0:
        return np.linspace(low, high, REFINE_POINTS)
    return np.geomspace(low, high, REFINE_POINTS)
