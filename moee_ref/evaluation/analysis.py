"""The paper's analyses of HS and RW as functions: sections 3.2, 4.4 and 4.5.

* prompt robustness (Figures 4 and 5): the cosine similarities of a set of
  pairs under several prompts, for HS and for RW; the Spearman correlation
  matrix between all these similarity vectors and the mean of each block;
  with gold scores, each prompt's Spearman against gold and its spread.
* complementarity (Table 1): k-means on HS and on RW separately, and how much
  the two clusterings agree (AMI, NMI, pairwise Jaccard, exact matching);
  plus the Spearman correlation of HS and RW cosine similarities over pairs
  of the texts.
* error analysis (Figure 2, Tables 6 and 7): which pairs each embedding ranks
  far from the gold ranking, and the pairs one gets right and the other wrong.

Definitions the paper leaves open, fixed here:

* Block means of the correlation matrix leave out the diagonal of the HS-HS
  and RW-RW blocks (each similarity vector with itself) and average over all
  P x P entries of the HS-RW block (same prompt and different prompts).
  Undefined correlations (a constant similarity vector) are left out of means.
* The spread across prompts is the mean and the population variance (ddof=0).
* k-means runs on L2-normalised rows (so that Euclidean distance is monotone
  in the cosine that scores everything else), with scikit-learn's KMeans,
  n_init=10 and random_state=seed.
* Pairwise Jaccard: over all pairs of points, (pairs put together by both
  clusterings) / (pairs put together by at least one). When neither
  clustering puts any pair together it is 1 (the two agree exactly).
* Exact matching (the paper's footnote 2: "the proportion of data points that
  are grouped into identical clusters by two different methods"): the share
  of points whose cluster agrees after the best one-to-one matching of the
  cluster ids of one clustering to those of the other (the Hungarian
  assignment maximising the number of agreeing points). Cluster ids are
  arbitrary, so a relabelled clustering matches exactly (1.0).
* Error analysis: pairs are ranked by gold score and by similarity (average
  ranks for ties, both ascending) and ranks are normalised to [0, 1] as
  (rank - 1) / (n - 1). The rank error of a pair is its normalised rank by
  similarity minus its normalised rank by gold; the pair fails for that
  embedding when |rank error| > threshold (strictly; default 0.2, a fifth of
  the ranking). Normalised ranks make the threshold mean the same for any
  number of pairs.

Clustering scores and the matching need the optional `analysis` extra
(scikit-learn, which brings scipy); everything else is numpy only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Sequence

import numpy as np

from ..io.inputs import Pairs
from ..errors import InputError, MoEERefError
from ..embedding.stats import cosine_rows, rankdata, spearman

DEFAULT_THRESHOLD = 0.2
DEFAULT_SAMPLE_PAIRS = 10000
KMEANS_N_INIT = 10
ANALYSIS_EXTRA_MESSAGE = (
    "moee analyze complementarity needs scikit-learn, the optional analysis extra: pip install scikit-learn (in a clone of moee-ref: pip install -e '.[analysis]')"
)

# The groups of the error analysis, in the order of Figure 2.
ERROR_GROUPS = ("hs_succeeds_rw_fails", "hs_fails_rw_succeeds", "both_fail")
ERROR_GROUP_TITLES = {
    "hs_succeeds_rw_fails": "HS succeeds, RW fails",
    "hs_fails_rw_succeeds": "HS fails, RW succeeds",
    "both_fail": "both fail",
}


class MissingAnalysisExtra(MoEERefError):
    """scikit-learn (the optional `analysis` extra) is not installed."""


def require_analysis_extra() -> None:
    """Raise MissingAnalysisExtra unless scikit-learn (and so scipy) can be imported."""
    try:
        import scipy.optimize  # noqa: F401  (a dependency of scikit-learn)
        import sklearn  # noqa: F401
    except ImportError:
        raise MissingAnalysisExtra(ANALYSIS_EXTRA_MESSAGE) from None


# --------------------------------------------------------------------------- correlation matrix


def spearman_matrix(similarity_vectors) -> np.ndarray:
    """Spearman correlation between every two rows of an [M, n] array (ties get average ranks).

    Symmetric, with 1 on the diagonal; rows and columns of a constant vector are NaN.
    """
    vectors = np.asarray(similarity_vectors, dtype=np.float64)
    if vectors.ndim != 2:
        raise InputError(f"similarity_vectors must be [M, n], got shape {vectors.shape}")
    if vectors.shape[1] < 2:
        raise InputError(f"a Spearman correlation needs at least 2 pairs, got {vectors.shape[1]}")
    ranks = np.stack([rankdata(row) for row in vectors])
    centred = ranks - ranks.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    constant = norms == 0
    units = centred / np.where(constant, 1.0, norms)[:, None]
    matrix = np.clip(units @ units.T, -1.0, 1.0)
    np.fill_diagonal(matrix, 1.0)
    matrix[constant, :] = np.nan
    matrix[:, constant] = np.nan
    return matrix


def block_means(matrix, p: int) -> dict:
    """Means of the blocks of a [2p, 2p] HS/RW correlation matrix (HS rows/columns first).

    hs_hs, rw_rw: off-diagonal entries of the diagonal blocks (NaN when p == 1);
    hs_rw: all p * p entries of the cross block; hs_rw_same_prompt: its diagonal.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1 or matrix.shape != (2 * p, 2 * p):
        raise InputError(f"block_means needs a [2p, 2p] matrix and p >= 1; got shape {matrix.shape} and p={p!r}")
    off_diagonal = ~np.eye(p, dtype=bool)
    hs_hs, rw_rw, cross = matrix[:p, :p], matrix[p:, p:], matrix[:p, p:]
    return {
        "hs_hs": _mean(hs_hs[off_diagonal]),
        "rw_rw": _mean(rw_rw[off_diagonal]),
        "hs_rw": _mean(cross.ravel()),
        "hs_rw_same_prompt": _mean(np.diag(cross)),
    }


def _mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _spread(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not values.size:
        return {"mean": float("nan"), "variance": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(values.mean()), "variance": float(values.var()), "min": float(values.min()), "max": float(values.max())}


# --------------------------------------------------------------------------- features


def _feature_options(options, prompt):
    from ..embedding.embedder import FeatureOptions

    options = options or FeatureOptions()
    return dataclasses.replace(options, prompt=prompt)


def _unique_features(embedder, texts: Sequence[str], options, batch_size, show_progress_bar):
    """(HS, RW, truncated) of texts, each distinct text embedded once, rows in the order of texts."""
    unique = list(dict.fromkeys(texts))
    feats = embedder.features(unique, options, batch_size=batch_size, show_progress_bar=show_progress_bar)
    where = {text: i for i, text in enumerate(unique)}
    index = np.array([where[t] for t in texts], dtype=np.int64)
    return feats.hs[index], feats.rw[index], feats.num_truncated


def pair_similarities(embedder, first: Sequence[str], second: Sequence[str], *, options=None, prompt=None,
                      batch_size=None, show_progress_bar=None) -> tuple[np.ndarray, np.ndarray, int]:
    """Cosine similarity of every pair for HS and for RW under one prompt: (sim_hs, sim_rw, texts truncated)."""
    if len(first) != len(second):
        raise InputError(f"first has {len(first)} texts but second has {len(second)}; pairs need equal lengths")
    opts = _feature_options(options, prompt if prompt is not None else getattr(options, "prompt", None))
    n = len(first)
    hs, rw, truncated = _unique_features(embedder, list(first) + list(second), opts, batch_size, show_progress_bar)
    return cosine_rows(hs[:n], hs[n:]), cosine_rows(rw[:n], rw[n:]), truncated


# --------------------------------------------------------------------------- prompt robustness (Figures 4, 5)


def prompt_robustness(embedder, pairs: Pairs, prompts: Sequence[str] | None = None, *, options=None,
                      batch_size=None, show_progress_bar=None) -> dict:
    """Figures 4 and 5 on one set of pairs: how HS and RW similarities change with the prompt.

    prompts: built-in names or templates with {text}; default all built-in prompts.
    options: FeatureOptions for everything but the prompt (max_length, truncation, ...).
    Returns prompts, labels ("HS:<prompt>" then "RW:<prompt>"), the [2P, 2P]
    Spearman matrix between the similarity vectors, its block means, and
    with gold scores each prompt's Spearman against gold for HS and RW with
    their mean, variance, min and max across prompts (gold is None otherwise).
    """
    from ..embedding.prompts import list_prompts

    names = [name for name, _ in list_prompts()] if prompts is None else list(prompts)
    if not names:
        raise InputError("prompt_robustness needs at least one prompt")
    if len(set(names)) != len(names):
        raise InputError(f"prompts are repeated: {', '.join(names)}; give each once")
    if len(pairs) < 2:
        raise InputError(f"prompt_robustness needs at least 2 pairs to rank, got {len(pairs)}")
    sims_hs, sims_rw, truncated = [], [], 0
    for name in names:
        sim_hs, sim_rw, cut = pair_similarities(
            embedder, pairs.first, pairs.second, options=options, prompt=name,
            batch_size=batch_size, show_progress_bar=show_progress_bar,
        )
        sims_hs.append(sim_hs)
        sims_rw.append(sim_rw)
        truncated += cut
    labels = [f"HS:{n}" for n in names] + [f"RW:{n}" for n in names]
    vectors = np.stack(sims_hs + sims_rw)
    matrix = spearman_matrix(vectors)
    constant = [label for label, row in zip(labels, vectors) if np.all(row == row[0])]
    result = {
        "pairs": len(pairs),
        "prompts": names,
        "labels": labels,
        "matrix": matrix.tolist(),
        "block_means": block_means(matrix, len(names)),
        "constant": constant,
        "gold": None,
        "truncated": truncated,
    }
    if pairs.scores is not None:
        gold = np.asarray(pairs.scores, dtype=np.float64)
        hs = {name: spearman(s, gold) for name, s in zip(names, sims_hs)}
        rw = {name: spearman(s, gold) for name, s in zip(names, sims_rw)}
        result["gold"] = {"hs": hs, "rw": rw, "summary": {"hs": _spread(list(hs.values())), "rw": _spread(list(rw.values()))}}
    return result


def plot_prompt_robustness(result: dict, path, title: str | None = None) -> None:
    """Two panels: the Spearman heatmap (Figure 4) and the per-prompt spread (Figure 5; needs the plot extra).

    The spread is each prompt's Spearman against gold for HS and RW when the
    pairs have gold scores, else the off-diagonal correlations of each block.
    """
    from .plot import pyplot, save_figure

    plt = pyplot()
    p = len(result["prompts"])
    matrix = np.asarray(result["matrix"], dtype=np.float64)
    lowest = np.nanmin(matrix) if np.isfinite(matrix).any() else 0.0
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(6 + 0.7 * p, 3.5 + 0.5 * p), gridspec_kw={"width_ratios": [3, 2]}, layout="constrained"
    )
    try:
        image = left.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=min(0.0, lowest), vmax=1)
        left.set_xticks(range(2 * p), result["labels"], rotation=90, fontsize=7)
        left.set_yticks(range(2 * p), result["labels"], fontsize=7)
        left.axhline(p - 0.5, color="white", linewidth=1.5)
        left.axvline(p - 0.5, color="white", linewidth=1.5)
        means = result["block_means"]
        left.set_title(
            "Spearman between pair similarities\n"
            f"HS-HS {_fmt(means['hs_hs'])}, RW-RW {_fmt(means['rw_rw'])}, HS-RW {_fmt(means['hs_rw'])}",
            fontsize=9,
        )
        fig.colorbar(image, ax=left, fraction=0.046, pad=0.02)
        if result["gold"] is not None:
            groups = [list(result["gold"]["hs"].values()), list(result["gold"]["rw"].values())]
            names, ylabel, subtitle = ["HS", "RW"], "Spearman against gold", "per-prompt performance"
        else:
            off = ~np.eye(p, dtype=bool)
            groups = [matrix[:p, :p][off], matrix[p:, p:][off], matrix[:p, p:].ravel()]
            names, ylabel, subtitle = ["HS-HS", "RW-RW", "HS-RW"], "Spearman between similarity vectors", "agreement across prompts (no gold)"
        groups = [values[~np.isnan(values)] for values in (np.asarray(g, dtype=np.float64) for g in groups)]
        right.boxplot(groups, showmeans=True, showfliers=False)  # every point is drawn below
        right.set_xticks(range(1, len(names) + 1), names)
        right.set_ylabel(ylabel)
        right.set_title(subtitle, fontsize=9)
        for position, values in enumerate(groups, start=1):
            right.scatter(position + np.linspace(-0.08, 0.08, len(values)), values, s=12, alpha=0.7, zorder=3)
        if title:
            fig.suptitle(title, fontsize=10)
        save_figure(fig, path)
    finally:
        plt.close(fig)


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


# --------------------------------------------------------------------------- clustering agreement (Table 1)


def _check_labels(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape:
        raise InputError(f"two clusterings need one label per point each, got shapes {a.shape} and {b.shape}")
    if a.size == 0:
        raise InputError("the clusterings are empty; they need at least one point")
    return a, b


def contingency(a, b) -> np.ndarray:
    """[clusters of a, clusters of b] counts of points (cluster ids in sorted order)."""
    a, b = _check_labels(a, b)
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), dtype=np.int64)
    np.add.at(table, (ia.ravel(), ib.ravel()), 1)
    return table


def pairwise_jaccard(a, b) -> float:
    """Jaccard index over pairs of points: pairs together in both clusterings / pairs together in at least one."""
    table = contingency(a, b)

    def pairs(counts) -> int:
        counts = np.asarray(counts, dtype=np.int64)
        return int((counts * (counts - 1) // 2).sum())

    both = pairs(table)
    either = pairs(table.sum(axis=1)) + pairs(table.sum(axis=0)) - both
    return 1.0 if either == 0 else both / either


def exact_matching(a, b) -> float:
    """Share of points in the same cluster after the best one-to-one matching of cluster ids (needs the analysis extra)."""
    table = contingency(a, b)
    require_analysis_extra()
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def clustering_agreement(labels_a, labels_b) -> dict:
    """AMI, NMI (arithmetic mean normalisation, scikit-learn's default), pairwise Jaccard and exact matching."""
    a, b = _check_labels(labels_a, labels_b)
    require_analysis_extra()
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    return {
        "ami": float(adjusted_mutual_info_score(a, b)),
        "nmi": float(normalized_mutual_info_score(a, b)),
        "jaccard": pairwise_jaccard(a, b),
        "exact_match": exact_matching(a, b),
    }


def kmeans_labels(vectors, k: int, seed: int = 0, n_init: int = KMEANS_N_INIT) -> tuple[np.ndarray, list[str]]:
    """k-means cluster ids of the L2-normalised rows, and any warnings scikit-learn gave (e.g. fewer distinct points than k)."""
    require_analysis_extra()
    from sklearn.cluster import KMeans

    x = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)
    notes = list(dict.fromkeys(str(w.message).strip() for w in caught))
    return labels.astype(np.int64), notes


def pair_index(k, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (i, j), i < j, at positions k of the row-major list of all pairs of n items."""
    k = np.asarray(k, dtype=np.int64)
    # Row i starts at position S(i) = i * (2n - i - 1) / 2: solve S(i) <= k for the largest i, then fix rounding.
    b = 2 * n - 1
    i = np.floor((b - np.sqrt(np.maximum(b * b - 8.0 * k, 0.0))) / 2).astype(np.int64)
    i = np.clip(i, 0, n - 2)

    def start(row):
        return row * (2 * n - row - 1) // 2

    for _ in range(2):
        i = np.where(start(i) > k, i - 1, i)
        i = np.where(start(i + 1) <= k, i + 1, i)
    return i, k - start(i) + i + 1


def pair_sample(n: int, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j of n items when there are at most count of them, else count of them drawn without replacement (fixed seed), in order."""
    total = n * (n - 1) // 2
    if total <= count:
        return np.triu_indices(n, k=1)
    picked = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    return pair_index(picked, n)


def complementarity(embedder, texts: Sequence[str], k: int, seed: int = 0, sample_pairs: int = DEFAULT_SAMPLE_PAIRS, *,
                    options=None, batch_size=None, show_progress_bar=None, n_init: int = KMEANS_N_INIT) -> dict:
    """Table 1 on a list of texts: k-means on HS and on RW separately and the agreement of the two clusterings,
    plus the Spearman correlation between HS and RW cosine similarities over (sampled) pairs of the texts."""
    require_analysis_extra()
    texts = list(texts)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise InputError(f"the number of clusters must be an integer >= 2, got {k!r}")
    if isinstance(sample_pairs, bool) or not isinstance(sample_pairs, (int, np.integer)) or sample_pairs < 2:
        raise InputError(f"sample_pairs must be an integer >= 2, got {sample_pairs!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")
    if len(texts) < 3:
        raise InputError(f"complementarity needs at least 3 texts, got {len(texts)}")
    if k > len(texts):
        raise InputError(f"cannot make {k} clusters of {len(texts)} texts; lower the number of clusters")
    opts = _feature_options(options, getattr(options, "prompt", None))
    hs, rw, truncated = _unique_features(embedder, texts, opts, batch_size, show_progress_bar)
    labels_hs, notes_hs = kmeans_labels(hs, k, seed, n_init)
    labels_rw, notes_rw = kmeans_labels(rw, k, seed, n_init)
    first, second = pair_sample(len(texts), int(sample_pairs), seed)
    sim_hs, sim_rw = cosine_rows(hs[first], hs[second]), cosine_rows(rw[first], rw[second])
    total = len(texts) * (len(texts) - 1) // 2
    return {
        "texts": len(texts),
        "clusters": int(k),
        "seed": int(seed),
        "n_init": int(n_init),
        "agreement": clustering_agreement(labels_hs, labels_rw),
        "cluster_sizes": {"hs": np.bincount(labels_hs, minlength=k).tolist(), "rw": np.bincount(labels_rw, minlength=k).tolist()},
        "similarity_spearman": spearman(sim_hs, sim_rw),
        "sampled_pairs": int(len(first)),
        "total_pairs": int(total),
        "notes": [f"HS: {n}" for n in notes_hs] + [f"RW: {n}" for n in notes_rw],
        "prompt": opts.prompt or "none",
        "truncated": truncated,
    }


# --------------------------------------------------------------------------- error analysis (Figure 2, Tables 6, 7)


def normalised_ranks(values) -> np.ndarray:
    """Average ranks mapped to [0, 1]: (rank - 1) / (n - 1)."""
    ranks = rankdata(values)
    if ranks.size < 2:
        raise InputError(f"ranking needs at least 2 pairs, got {ranks.size}")
    return (ranks - 1.0) / (ranks.size - 1)


def rank_errors(sims, gold) -> np.ndarray:
    """Normalised rank by similarity minus normalised rank by gold, per pair (in [-1, 1]; > 0: ranked too similar)."""
    sims, gold = np.asarray(sims, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if sims.shape != gold.shape or sims.ndim != 1:
        raise InputError(f"similarities and gold scores need one value per pair each, got shapes {sims.shape} and {gold.shape}")
    if sims.size < 2:
        raise InputError(f"ranking needs at least 2 pairs, got {sims.size}")
    # One division of the exact rank difference: equal differences give equal errors, so a
    # threshold like 0.4 compares the same way for every pair (no rounding of two divisions).
    return (rankdata(sims) - rankdata(gold)) / (sims.size - 1)


def error_analysis(sim_hs, sim_rw, gold, threshold: float = DEFAULT_THRESHOLD, show: int = 5,
                   first: Sequence[str] | None = None, second: Sequence[str] | None = None) -> dict:
    """Figure 2: among the pairs where HS or RW fails (|rank error| > threshold), the shares where
    only RW fails, only HS fails, or both fail (they sum to 1), with counts; and per group the
    `show` pairs with the largest rank error of the failing embedding (of either, for both_fail).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise InputError(f"threshold must be a number in [0, 1] (normalised ranks), got {threshold!r}")
    if isinstance(show, bool) or not isinstance(show, (int, np.integer)) or show < 0:
        raise InputError(f"show must be an integer >= 0, got {show!r}")
    sim_hs, sim_rw, gold = (np.asarray(x, dtype=np.float64) for x in (sim_hs, sim_rw, gold))
    if not sim_hs.shape == sim_rw.shape == gold.shape:
        raise InputError(f"sim_hs, sim_rw and gold need one value per pair each, got shapes {sim_hs.shape}, {sim_rw.shape}, {gold.shape}")
    for name, texts in (("first", first), ("second", second)):
        if texts is not None and len(texts) != gold.size:
            raise InputError(f"{name} has {len(texts)} texts for {gold.size} pairs")
    err_hs, err_rw = rank_errors(sim_hs, gold), rank_errors(sim_rw, gold)
    fail_hs, fail_rw = np.abs(err_hs) > threshold, np.abs(err_rw) > threshold
    members = {
        "hs_succeeds_rw_fails": ~fail_hs & fail_rw,
        "hs_fails_rw_succeeds": fail_hs & ~fail_rw,
        "both_fail": fail_hs & fail_rw,
    }
    telling = {  # the failing embedding's rank error
        "hs_succeeds_rw_fails": np.abs(err_rw),
        "hs_fails_rw_succeeds": np.abs(err_hs),
        "both_fail": np.maximum(np.abs(err_hs), np.abs(err_rw)),
    }
    failing = int((fail_hs | fail_rw).sum())
    counts = {group: int(mask.sum()) for group, mask in members.items()}
    shares = {group: (counts[group] / failing if failing else None) for group in ERROR_GROUPS}
    examples = {}
    for group in ERROR_GROUPS:
        indices = np.flatnonzero(members[group])
        indices = sorted(indices, key=lambda i: (-telling[group][i], i))[:show]
        examples[group] = [
            {
                "index": int(i),
                **({"sentence1": first[i]} if first is not None else {}),
                **({"sentence2": second[i]} if second is not None else {}),
                "gold": float(gold[i]),
                "sim_hs": float(sim_hs[i]),
                "sim_rw": float(sim_rw[i]),
                "rank_error_hs": float(err_hs[i]),
                "rank_error_rw": float(err_rw[i]),
            }
            for i in indices
        ]
    return {
        "pairs": int(gold.size),
        "threshold": float(threshold),
        "failing_pairs": failing,
        "counts": {**counts, "both_succeed": int(gold.size - failing), "hs_fails": int(fail_hs.sum()), "rw_fails": int(fail_rw.sum())},
        "shares": shares,
        "spearman": {"hs": spearman(sim_hs, gold), "rw": spearman(sim_rw, gold)},
        "examples": examples,
    }


def error_analysis_for_pairs(embedder, pairs: Pairs, threshold: float = DEFAULT_THRESHOLD, show: int = 5, *, options=None,
                             batch_size=None, show_progress_bar=None) -> dict:
    """error_analysis() on scored pairs, embedding them with HS and RW under options (prompt included)."""
    if pairs.scores is None:
        raise InputError("the error analysis needs gold scores; the pairs have none")
    if len(pairs) < 2:
        raise InputError(f"the error analysis needs at least 2 pairs to rank, got {len(pairs)}")
    sim_hs, sim_rw, truncated = pair_similarities(
        embedder, pairs.first, pairs.second, options=options, batch_size=batch_size, show_progress_bar=show_progress_bar,
    )
    result = error_analysis(sim_hs, sim_rw, pairs.scores, threshold, show, pairs.first, pairs.second)
    result["prompt"] = getattr(options, "prompt", None) or "none"
    result["truncated"] = truncated
    return result
