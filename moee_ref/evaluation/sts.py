"""STS-style evaluation the way the paper scores embeddings: Spearman (and Pearson) of cosine against gold."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..io.inputs import Pairs
from ..errors import InputError
from ..embedding.alpha import MIN_PAIRS
from ..embedding.embedder import FeatureOptions, MoEEmbedder
from ..embedding.kinds import KINDS, combine
from ..embedding.pipeline import apply_standardizers, choose_alpha
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
    alpha: float | str = 1.0,
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

    rows, auto, supervised, notes = [], None, None, []
    if len(pairs) >= MIN_PAIRS:
        auto = choose_alpha(sim_hs, sim_rw)
    else:  # the rows that need no alpha choice are still reported
        notes.append(f"the auto alpha row needs at least {MIN_PAIRS} pairs ({len(pairs)} given): left out")
    if dev_pairs is not None and any(kind.uses_alpha for kind in KINDS.values()):
        (dh_a, dr_a), (dh_b, dr_b), _ = pair_features(embedder, dev_pairs, options, batch_size, standardizer, show_progress_bar)
        supervised = choose_alpha(cosine_rows(dh_a, dh_b), cosine_rows(dr_a, dr_b), dev_pairs.scores)
    for name, kind in KINDS.items():
        if not kind.uses_alpha:  # the cosine of the kind's vectors
            rows.append(row(name, cosine_rows(combine(hs_a, rw_a, name), combine(hs_b, rw_b, name))))
            continue
        # A kind that weighs RW against HS scores cos(HS) + alpha cos(RW), for a fixed, the label-free and the dev alpha.
        # alpha "auto" asks for the auto row alone (no fixed one).
        for value, rule in ((None if alpha == "auto" else alpha, "fixed"), (auto and auto.alpha, "auto"),
                            (supervised and supervised.alpha, "supervised")):
            if value is not None:
                rows.append(row(name, sim_hs + value * sim_rw, value, rule))
    result = {"pairs": len(pairs), "truncated": truncated, "rows": [asdict(r) for r in rows]}
    if notes:
        result["notes"] = notes
    return result


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
    for kind in [name for name, k in KINDS.items() if k.official is not None]:
        a, b = first.vectors(kind, float(alpha), ensemble), second.vectors(kind, float(alpha), ensemble)
        sims = official_similarity(a, b, kind, embedder.args.hidden_size, float(alpha))
        fixed = KINDS[kind].uses_alpha
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
    lines += [f"note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)
