"""Small statistics helpers in plain numpy: ranks, correlations, row cosines.

Correlations follow scipy's convention for a constant input: the coefficient
is undefined and ``float('nan')`` is returned (scipy also warns; we do not).
Malformed input -- different lengths, fewer than two items, non-finite values,
not one-dimensional -- raises ``InputError`` instead.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError


def _as_finite_vector(x, name: str) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 1:
        raise InputError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} contains NaN or infinite values; remove or fix them first")
    return array


def _as_paired_vectors(a, b) -> tuple[np.ndarray, np.ndarray]:
    x = _as_finite_vector(a, "a")
    y = _as_finite_vector(b, "b")
    if x.shape != y.shape:
        raise InputError(f"a and b must have the same length, got {x.size} and {y.size}")
    if x.size < 2:
        raise InputError(f"a correlation needs at least 2 pairs, got {x.size}")
    return x, y


def rankdata(x) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties sharing their average rank.

    Same result as ``scipy.stats.rankdata(x, method="average")``.
    """
    values = _as_finite_vector(x, "x")
    n = values.size
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # A new tie group starts wherever the sorted value changes.
    starts_group = np.empty(n, dtype=bool)
    starts_group[:1] = True
    starts_group[1:] = sorted_values[1:] != sorted_values[:-1]
    group_of_sorted = np.cumsum(starts_group) - 1
    group_starts = np.flatnonzero(starts_group)
    group_ends = np.append(group_starts[1:], n)  # exclusive
    # Positions start..end-1 hold ranks start+1..end; their mean is (start+1+end)/2.
    group_average_rank = (group_starts + 1 + group_ends) / 2.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = group_average_rank[group_of_sorted]
    return ranks


def _pearson_of_vectors(x: np.ndarray, y: np.ndarray) -> float:
    dx = x - x.mean()
    dy = y - y.mean()
    denominator = np.sqrt(np.dot(dx, dx) * np.dot(dy, dy))
    if denominator == 0.0:
        return float("nan")  # a constant input: correlation undefined
    # Rounding can push a perfect correlation a hair past 1.
    return float(np.clip(np.dot(dx, dy) / denominator, -1.0, 1.0))


def pearson(a, b) -> float:
    """Pearson correlation of two equally long 1-D arrays; nan if one is constant."""
    x, y = _as_paired_vectors(a, b)
    return _pearson_of_vectors(x, y)


def spearman(a, b) -> float:
    """Spearman rank correlation (ties get average ranks); nan if one is constant."""
    x, y = _as_paired_vectors(a, b)
    return _pearson_of_vectors(rankdata(x), rankdata(y))


def cosine_rows(a, b) -> np.ndarray:
    """Cosine similarity of matching rows of two ``[N, D]`` arrays, as float64 ``[N]``.

    A zero row has no direction; its cosine is defined as 0 (never NaN), so a
    degenerate embedding counts as "unrelated" rather than poisoning a metric.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2:
        raise InputError(f"cosine_rows expects two [N, D] arrays, got shapes {x.shape} and {y.shape}")
    if x.shape != y.shape:
        raise InputError(f"cosine_rows needs arrays of the same shape, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise InputError("cosine_rows input contains NaN or infinite values; fix the embeddings first")
    # Normalising each row before the dot product avoids overflow of |a|*|b|.
    cosines = np.sum(_unit_rows(x) * _unit_rows(y), axis=1)
    return np.clip(cosines, -1.0, 1.0)  # rounding can step just past +-1


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    safe_norms = np.where(norms > 0.0, norms, 1.0)
    return np.where(norms > 0.0, x / safe_norms, 0.0)
