"""STS-style evaluation the way the paper scores embeddings: Spearman (and Pearson) of cosine against gold."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..io.inputs import Pairs
from ..errors import InputError
from ..embedding.embedder import FeatureOptions, MoEEmbedder, apply_standardizers, choose_alpha, combine
from ..embedding.stats import cosine_rows, pearson, spearman


@dataclass
class ScoreRow:
    embedding: str  # hs, rw, moee-concat, moee-sum
    alpha: float | None
    alpha_rule: str | None  # "fixed", "auto" (label-free, section 3.3), "supervised" (dev pairs)
    spearman: float
    pearson: float


def pair_features(embedder: MoEEmbedder, pairs: Pairs, options: FeatureOptions, batch_size=None, standardizer=None, show_progress_bar=None):
    """(HS, RW) of both sides of every pair, each distinct text embedded once."""
    unique = list(dict.fromkeys(pairs.first + pairs.second))
    feats = embedder.features(unique, options, batch_size=batch_size, show_progress_bar=show_progress_bar)
    hs, rw = apply_standardizers(feats.hs, feats.rw, standardizer)
    where = {text: i for i, text in enumerate(unique)}
    a = np.array([where[t] for t in pairs.first])
    b = np.array([where[t] for t in pairs.second])
    return (hs[a], rw[a]), (hs[b], rw[b]), feats.num_truncated


def evaluate_sts(
    embedder: MoEEmbedder,
    pairs: Pairs,
    *,
    alpha: float = 1.0,
    dev_pairs: Pairs | None = None,
    options: FeatureOptions | None = None,
    batch_size: int | None = None,
    standardizer=None,
    show_progress_bar: bool | None = None,
) -> dict:
    """Spearman and Pearson of every embedding kind against gold; moee-sum with fixed, auto and (with dev pairs) supervised alpha."""
    options = options or FeatureOptions()
    check_gold(pairs.scores, "pairs")  # before the embedding, not as nan in the table after it
    if dev_pairs is not None:
        check_gold(dev_pairs.scores, "dev pairs")
    (hs_a, rw_a), (hs_b, rw_b), truncated = pair_features(embedder, pairs, options, batch_size, standardizer, show_progress_bar)
    gold = np.asarray(pairs.scores, dtype=np.float64)
    sim_hs, sim_rw = cosine_rows(hs_a, hs_b), cosine_rows(rw_a, rw_b)

    def row(kind, sims, alpha_value=None, rule=None) -> ScoreRow:
        return ScoreRow(kind, alpha_value, rule, spearman(sims, gold), pearson(sims, gold))

    concat = cosine_rows(combine(hs_a, rw_a, "moee-concat"), combine(hs_b, rw_b, "moee-concat"))
    rows = [row("hs", sim_hs), row("rw", sim_rw), row("moee-concat", concat), row("moee-sum", sim_hs + alpha * sim_rw, alpha, "fixed")]
    auto = choose_alpha(sim_hs, sim_rw)
    rows.append(row("moee-sum", sim_hs + auto.alpha * sim_rw, auto.alpha, "auto"))
    if dev_pairs is not None:
        (dh_a, dr_a), (dh_b, dr_b), _ = pair_features(embedder, dev_pairs, options, batch_size, standardizer, show_progress_bar)
        supervised = choose_alpha(cosine_rows(dh_a, dh_b), cosine_rows(dr_a, dr_b), dev_pairs.scores)
        rows.append(row("moee-sum", sim_hs + supervised.alpha * sim_rw, supervised.alpha, "supervised"))
    return {"pairs": len(pairs), "truncated": truncated, "rows": [asdict(r) for r in rows]}


def evaluate_sts_official(
    embedder: MoEEmbedder,
    pairs: Pairs,
    *,
    prompt: str | None = None,
    instruction: str | None = None,
    alpha: float = 1.0,
    ensemble: str = "standardized",
    batch_size: int | None = None,
    show_progress_bar: bool | None = None,
) -> dict:
    """The STS scores of the authors' evaluation: the first sentences, then the second ones, embedded in file order
    in batches of batch_size (official.py), scored by their paired cosine; moee-sum is their similarity ensemble."""
    from ..embedding.official import official_batches, official_similarity

    check_gold(pairs.scores, "pairs")
    settings = dict(prompt=prompt, instruction=instruction, alpha=alpha, ensemble=ensemble, batch_size=batch_size,
                    show_progress_bar=show_progress_bar)
    first = official_batches(embedder, pairs.first, **settings)
    second = official_batches(embedder, pairs.second, **settings)
    gold = np.asarray(pairs.scores, dtype=np.float64)
    rows = []
    for kind in ("hs", "rw", "moee-concat", "moee-sum"):
        a, b = first.vectors(kind, float(alpha), ensemble), second.vectors(kind, float(alpha), ensemble)
        sims = official_similarity(a, b, kind, embedder.args.hidden_size, float(alpha))
        fixed = kind == "moee-sum"
        rows.append(ScoreRow(kind, float(alpha) if fixed else None, "fixed" if fixed else None, spearman(sims, gold), pearson(sims, gold)))
    return {"pairs": len(pairs), "truncated": 0, "mode": "official", "batch_size": first.batch_size, "ensemble": ensemble,
            "instruction": instruction, "rows": [asdict(r) for r in rows]}


def check_gold(scores, what: str) -> None:
    """Correlations with constant gold scores are undefined: refuse them with the reason, not a table of nan."""
    if scores is None or len(scores) < 2:
        raise InputError(f"{what}: {0 if scores is None else len(scores)} scored pair(s); a correlation needs at least 2")
    if np.ptp(np.asarray(scores, dtype=np.float64)) == 0:
        raise InputError(f"{what}: all {len(scores)} gold scores are {scores[0]:g}; correlations with a constant are "
                         "undefined, so check the score column")


def format_sts_table(result: dict) -> str:
    lines = [f"{'embedding':<12} {'alpha':>16}  {'spearman':>8}  {'pearson':>8}"]
    for r in result["rows"]:
        alpha = "" if r["alpha"] is None else f"{r['alpha']:.4g} ({r['alpha_rule']})"
        lines.append(f"{r['embedding']:<12} {alpha:>16}  {r['spearman']:8.4f}  {r['pearson']:8.4f}")
    lines.append(f"{result['pairs']} pairs" + (f", {result['truncated']} texts truncated" if result["truncated"] else ""))
    if result.get("mode") == "official":
        instruction = "no instruction" if result["instruction"] is None else f"instruction {result['instruction']!r}"
        lines[-1] += (f"; the authors' pipeline: batches of {result['batch_size']}, {instruction}, "
                      f"moee-sum of {result['ensemble']} HS and RW")
    return "\n".join(lines)
