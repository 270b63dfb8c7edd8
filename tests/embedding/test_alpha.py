import dataclasses

import numpy as np
import pytest

from moee_ref.embedding.alpha import (
    ALPHA_MAX,
    SUPERVISED_CRITERION,
    UNSUPERVISED_CRITERION,
    AlphaChoice,
    select_alpha_supervised,
    select_alpha_unsupervised,
)
from moee_ref.errors import InputError
from moee_ref.embedding.stats import spearman

# A hand-worked case. s = h + a*r with h = [1, 2, 3], r = [3, 1, 2]:
# pairs 1 and 2 swap order at a = 0.5, pairs 1 and 3 at a = 2 (pairs 2 and 3
# never swap for a >= 0). The ranking of s is [1,2,3] below 0.5, [2,1,3] on
# (0.5, 2) and [3,1,2] above 2. Spearman(h, r) = -0.5, so the unsupervised
# score is 1 - 0.5 = 0.5 outside (0.5, 2) and 0.5 + 0.5 = 1 inside it.
HAND_HS = [1.0, 2.0, 3.0]
HAND_RW = [3.0, 1.0, 2.0]


def complementarity(hs, rw, alpha):
    combined = np.asarray(hs) + alpha * np.asarray(rw)
    return spearman(combined, hs) + spearman(combined, rw)


def independent_similarities(seed, n=300):
    rng = np.random.default_rng(seed)
    return rng.normal(size=n), rng.normal(size=n)


# --- supervised ----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_supervised_recovers_the_generating_ratio(seed):
    hs, rw = independent_similarities(seed)
    # Spearman of s with gold is 1 only when s orders pairs like gold, i.e. alpha near 0.7.
    choice = select_alpha_supervised(hs, rw, hs + 0.7 * rw)
    assert choice.alpha == pytest.approx(0.7, rel=0.02)
    assert choice.score == pytest.approx(1.0)
    assert choice.criterion == SUPERVISED_CRITERION


def test_supervised_is_invariant_to_monotone_transforms_of_gold():
    hs, rw = independent_similarities(5)
    gold = np.exp(hs + 2.5 * rw)
    assert select_alpha_supervised(hs, rw, gold).alpha == pytest.approx(2.5, rel=0.02)


def test_supervised_hand_case_finds_lower_edge_of_perfect_plateau():
    gold = [2.0, 1.0, 3.0]  # the ranking s has on (0.5, 2)
    choice = select_alpha_supervised(HAND_HS, HAND_RW, gold)
    assert 0.5 < choice.alpha < 0.501
    assert choice.score == pytest.approx(1.0)


def test_supervised_prefers_zero_when_rw_only_hurts():
    hs, rw = independent_similarities(7)
    choice = select_alpha_supervised(hs, rw, gold=hs)
    assert choice.alpha == 0.0
    assert choice.score == pytest.approx(1.0)


# --- unsupervised --------------------------------------------------------


def test_unsupervised_hand_case():
    choice = select_alpha_unsupervised(HAND_HS, HAND_RW)
    assert 0.5 < choice.alpha < 0.501
    assert choice.score == pytest.approx(1.0)
    assert choice.criterion == UNSUPERVISED_CRITERION


def test_unsupervised_scales_inversely_with_rw():
    # Scaling s_RW by 10 scales every swap point, and so the chosen alpha, by 1/10.
    choice = select_alpha_unsupervised(HAND_HS, np.array(HAND_RW) * 10.0)
    assert 0.05 < choice.alpha < 0.0501


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unsupervised_symmetric_construction_peaks_at_one(seed):
    # Every (h, r) pair also appears as (r, h), so the criterion satisfies
    # f(a) == f(1/a); for independent Gaussians its population maximum is a = 1.
    x, y = independent_similarities(seed, n=500)
    hs, rw = np.concatenate([x, y]), np.concatenate([y, x])
    choice = select_alpha_unsupervised(hs, rw)
    assert complementarity(hs, rw, choice.alpha) == pytest.approx(complementarity(hs, rw, 1 / choice.alpha))
    assert abs(np.log(choice.alpha)) < np.log(1.05)


@pytest.mark.parametrize("seed", [3, 4])
def test_unsupervised_matches_brute_force_grid(seed):
    rng = np.random.default_rng(seed)
    hs = rng.normal(size=200)
    rw = 0.5 * hs + rng.normal(size=200)  # correlated components, asymmetric
    choice = select_alpha_unsupervised(hs, rw)
    # Never worse than the coarse grid the search starts from...
    coarse_alphas = np.concatenate(([0.0], np.geomspace(1e-3, 1e3, 241)))
    assert choice.score >= max(complementarity(hs, rw, alpha) for alpha in coarse_alphas)
    # ...and level with a 17x finer brute-force grid. The criterion is a step
    # function whose top is a cluster of narrow plateaus differing by ~1e-5
    # here, so one of them may be missed; the tolerance allows exactly that.
    brute_alphas = np.concatenate(([0.0], np.geomspace(1e-3, 1e3, 4001)))
    brute_best = max(complementarity(hs, rw, alpha) for alpha in brute_alphas)
    assert choice.score >= brute_best - 1e-4
    assert choice.score == pytest.approx(complementarity(hs, rw, choice.alpha), abs=1e-12)
    assert 0.0 <= choice.alpha <= ALPHA_MAX


def test_unsupervised_endpoints_score_equally():
    # alpha = 0 and alpha -> infinity both give 1 + spearman(h, r): a sanity
    # check of the criterion the search is built on.
    hs, rw = independent_similarities(8)
    assert complementarity(hs, rw, 0.0) == pytest.approx(complementarity(hs, rw, 1e9))


# --- behaviour shared by both ---------------------------------------------


def test_selection_is_deterministic():
    hs, rw = independent_similarities(11)
    assert select_alpha_unsupervised(hs, rw) == select_alpha_unsupervised(hs.copy(), rw.copy())
    gold = hs + 0.3 * rw + np.random.default_rng(12).normal(scale=0.5, size=hs.size)
    assert select_alpha_supervised(hs, rw, gold) == select_alpha_supervised(hs, rw, gold)


def test_explicit_grid_is_used_as_given_and_ties_go_to_smallest():
    # On the hand case: alpha 1 lies inside the best plateau.
    assert select_alpha_unsupervised(HAND_HS, HAND_RW, grid=[0.0, 1.0, 3.0]) == AlphaChoice(
        alpha=1.0, score=pytest.approx(1.0), criterion=UNSUPERVISED_CRITERION
    )
    # 0 and 3 both score 0.5: the smaller wins.
    choice = select_alpha_unsupervised(HAND_HS, HAND_RW, grid=[3.0, 0.0])
    assert choice.alpha == 0.0
    assert choice.score == pytest.approx(0.5)


def test_alpha_choice_is_frozen():
    choice = select_alpha_unsupervised(HAND_HS, HAND_RW)
    with pytest.raises(dataclasses.FrozenInstanceError):
        choice.alpha = 2.0


@pytest.mark.parametrize(
    "hs, rw, message",
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], "same pairs"),
        ([1.0, 2.0], [2.0, 1.0], "at least 3"),
        ([1.0, np.nan, 3.0], [3.0, 1.0, 2.0], "NaN"),
        ([1.0, 2.0, np.inf], [3.0, 1.0, 2.0], "NaN or infinite"),
        ([1.0, 2.0, 3.0], [0.5, 0.5, 0.5], "constant"),
        ([[1.0, 2.0, 3.0]], [[3.0, 1.0, 2.0]], "1-D"),
    ],
)
def test_unsupervised_rejects_bad_similarities(hs, rw, message):
    with pytest.raises(InputError, match=message):
        select_alpha_unsupervised(hs, rw)


def test_supervised_rejects_bad_gold():
    with pytest.raises(InputError, match="same pairs"):
        select_alpha_supervised(HAND_HS, HAND_RW, [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(InputError, match="constant"):
        select_alpha_supervised(HAND_HS, HAND_RW, [4.0, 4.0, 4.0])
    with pytest.raises(InputError, match="NaN"):
        select_alpha_supervised(HAND_HS, HAND_RW, [1.0, np.nan, 2.0])


@pytest.mark.parametrize("grid", [[], [-1.0, 1.0], [np.nan], [[0.5, 1.0]]])
def test_bad_grid_is_rejected(grid):
    with pytest.raises(InputError, match="grid"):
        select_alpha_unsupervised(HAND_HS, HAND_RW, grid=grid)
