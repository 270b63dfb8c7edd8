"""moee_ref.evaluation.analysis: every statistic on hand cases, then each analysis on a small random checkpoint."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from moee_ref.evaluation import analysis
from moee_ref.evaluation.analysis import (
    ANALYSIS_EXTRA_MESSAGE,
    MissingAnalysisExtra,
    block_means,
    clustering_agreement,
    complementarity,
    error_analysis,
    error_analysis_for_pairs,
    exact_matching,
    normalised_ranks,
    pair_index,
    pair_sample,
    pairwise_jaccard,
    prompt_robustness,
    rank_errors,
    spearman_matrix,
)
from moee_ref.io.inputs import Pairs
from moee_ref.embedding.embedder import MoEEmbedder
from moee_ref.errors import InputError, MoEERefError
from moee_ref.embedding.stats import cosine_rows, spearman
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint


def needs_sklearn():
    pytest.importorskip("sklearn", reason="needs the analysis extra (scikit-learn)")


# --------------------------------------------------------------------------- clustering agreement


def test_identical_clusterings_agree_fully():
    needs_sklearn()
    labels = [0, 0, 1, 1, 1, 2, 2, 0]
    assert clustering_agreement(labels, labels) == pytest.approx({"ami": 1.0, "nmi": 1.0, "jaccard": 1.0, "exact_match": 1.0})


def test_relabelled_clustering_agrees_fully():
    needs_sklearn()
    a = np.array([0, 0, 1, 1, 1, 2, 2, 0])
    permuted = np.array([2, 0, 1])[a]  # 0 -> 2, 1 -> 0, 2 -> 1
    assert clustering_agreement(a, permuted) == pytest.approx({"ami": 1.0, "nmi": 1.0, "jaccard": 1.0, "exact_match": 1.0})
    # Ids need not be integers or 0-based.
    assert clustering_agreement(a, np.array(["x", "y", "z"])[a])["exact_match"] == 1.0


def test_pairwise_jaccard_hand_case():
    # a puts together {0,1,2} and {3,4}: pairs 01 02 12 34.  b: {0,1} and {2,3,4}: pairs 01 23 24 34.
    # Together in both: 01, 34 (2); in at least one: 01 02 12 34 23 24 (6).
    assert pairwise_jaccard([0, 0, 0, 1, 1], [0, 0, 1, 1, 1]) == pytest.approx(2 / 6)
    # No pair together in both: 0.
    assert pairwise_jaccard([0, 0, 1, 1, 2], [0, 1, 0, 1, 2]) == 0.0
    # Neither clustering puts a pair together: they agree exactly.
    assert pairwise_jaccard([0, 1, 2], [5, 4, 3]) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_jaccard_matches_enumeration_of_pairs(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 3, size=15), rng.integers(0, 4, size=15)
    first, second = np.triu_indices(15, k=1)
    in_a, in_b = a[first] == a[second], b[first] == b[second]
    assert pairwise_jaccard(a, b) == pytest.approx((in_a & in_b).sum() / (in_a | in_b).sum())


def test_exact_matching_takes_the_best_one_to_one_matching():
    needs_sklearn()
    # Contingency [[3, 2], [2, 0]]: matching by the largest cell (a0-b0) gives 3 of 7 points,
    # the best matching (a0-b1, a1-b0) gives 2 + 2 = 4 of 7.
    a = [0, 0, 0, 0, 0, 1, 1]
    b = [0, 0, 0, 1, 1, 0, 0]
    assert exact_matching(a, b) == pytest.approx(4 / 7)
    # Plain label equality would give 0 here; a0 <-> b2 and a1 <-> b1 give 2 + 3 of 6.
    assert exact_matching([0, 0, 0, 1, 1, 1], [2, 2, 1, 1, 1, 1]) == pytest.approx(5 / 6)
    # Different numbers of clusters: the unmatched cluster's points disagree.
    assert exact_matching([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1]) == pytest.approx(4 / 6)


def test_agreement_input_checks():
    with pytest.raises(InputError, match="one label per point"):
        pairwise_jaccard([0, 1, 1], [0, 1])
    with pytest.raises(InputError, match="empty"):
        pairwise_jaccard([], [])


def test_missing_scikit_learn_gives_the_extra_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    for call in (
        lambda: clustering_agreement([0, 1, 1], [0, 1, 1]),
        lambda: exact_matching([0, 1, 1], [0, 1, 1]),
        lambda: complementarity(None, ["a", "b", "c"], 2),  # fails before touching the embedder
    ):
        with pytest.raises(MissingAnalysisExtra) as info:
            call()
        assert str(info.value) == ANALYSIS_EXTRA_MESSAGE
        assert isinstance(info.value, MoEERefError)
    assert ANALYSIS_EXTRA_MESSAGE == (
        "moee analyze complementarity needs scikit-learn, the optional analysis extra: pip install scikit-learn (in a clone of moee-ref: pip install -e '.[analysis]')"
    )
    # The numpy-only statistics still work.
    assert pairwise_jaccard([0, 1, 1], [0, 1, 1]) == 1.0


# --------------------------------------------------------------------------- correlation matrix and blocks


def test_block_means_hand_matrix():
    m = np.array(
        [
            [1.0, 0.2, 0.5, 0.6],
            [0.2, 1.0, 0.7, 0.9],
            [0.5, 0.7, 1.0, 0.4],
            [0.6, 0.9, 0.4, 1.0],
        ]
    )
    means = block_means(m, 2)
    assert means["hs_hs"] == pytest.approx(0.2)
    assert means["rw_rw"] == pytest.approx(0.4)
    assert means["hs_rw"] == pytest.approx((0.5 + 0.6 + 0.7 + 0.9) / 4)
    assert means["hs_rw_same_prompt"] == pytest.approx((0.5 + 0.9) / 2)


def test_block_means_one_prompt_and_nan_entries():
    means = block_means(np.array([[1.0, 0.3], [0.3, 1.0]]), 1)
    assert np.isnan(means["hs_hs"]) and np.isnan(means["rw_rw"]) and means["hs_rw"] == pytest.approx(0.3)
    m = np.ones((4, 4))
    m[0, 1] = m[1, 0] = np.nan  # an undefined correlation is left out of the mean
    m[2, 3] = m[3, 2] = 0.5
    assert np.isnan(block_means(m, 2)["hs_hs"]) and block_means(m, 2)["rw_rw"] == 0.5
    with pytest.raises(InputError, match=r"\[2p, 2p\]"):
        block_means(np.ones((3, 3)), 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_spearman_matrix_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(6, 20))
    vectors[2] = np.round(vectors[2])  # ties
    vectors[4] = vectors[0] ** 3  # monotone in row 0: correlation 1
    matrix = spearman_matrix(vectors)
    np.testing.assert_array_equal(np.diag(matrix), 1.0)
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_allclose(matrix, scipy_stats.spearmanr(vectors.T).statistic, atol=1e-12)
    assert matrix[0, 4] == pytest.approx(1.0)
    for i in range(6):
        for j in range(6):
            assert matrix[i, j] == pytest.approx(spearman(vectors[i], vectors[j]), abs=1e-12)


def test_spearman_matrix_constant_vector_is_nan():
    matrix = spearman_matrix([[1, 2, 3], [5, 5, 5], [3, 1, 2]])
    assert np.isnan(matrix[1]).all() and np.isnan(matrix[:, 1]).all()
    assert matrix[0, 2] == pytest.approx(-0.5)


# --------------------------------------------------------------------------- error analysis

GOLD = [0, 1, 2, 3, 4, 5]  # normalised ranks 0, .2, .4, .6, .8, 1
SIM_HS = [5, 1, 2, 3, 4, 0]  # pairs 0 and 5 swapped: rank errors +1 and -1, the rest 0
SIM_RW = [2, 4, 0, 1, 3, 5]  # rank errors +.4, +.6, -.4, -.4, -.2, 0


def test_rank_errors_normalised_with_average_ranks():
    np.testing.assert_allclose(rank_errors(SIM_HS, GOLD), [1, 0, 0, 0, 0, -1])
    np.testing.assert_allclose(rank_errors(SIM_RW, GOLD), [0.4, 0.6, -0.4, -0.4, -0.2, 0])
    # Ties: gold ranks 1.5, 1.5, 3 -> .25, .25, 1; similarity ranks 0, .5, 1.
    np.testing.assert_allclose(rank_errors([1, 2, 3], [1, 1, 2]), [-0.25, 0.25, 0])
    np.testing.assert_allclose(normalised_ranks([10, 30, 20]), [0, 1, 0.5])


def test_error_analysis_hand_case():
    result = error_analysis(SIM_HS, SIM_RW, GOLD, threshold=0.2, show=2, first=list("abcdef"), second=list("ABCDEF"))
    # HS fails {0, 5}; RW fails {0, 1, 2, 3} (pair 4's error is exactly 0.2: not beyond the threshold).
    # Only RW fails: {1, 2, 3}; only HS: {5}; both: {0}; both succeed: {4}.
    assert result["failing_pairs"] == 5
    assert result["counts"] == {
        "hs_succeeds_rw_fails": 3, "hs_fails_rw_succeeds": 1, "both_fail": 1, "both_succeed": 1, "hs_fails": 2, "rw_fails": 4,
    }
    assert result["shares"] == pytest.approx({"hs_succeeds_rw_fails": 3 / 5, "hs_fails_rw_succeeds": 1 / 5, "both_fail": 1 / 5})
    assert sum(result["shares"].values()) == pytest.approx(1.0)
    # Largest rank error of the failing embedding first (RW: pair 1 at .6, then 2 and 3 at .4), at most `show`.
    assert [e["index"] for e in result["examples"]["hs_succeeds_rw_fails"]] == [1, 2]
    assert [e["index"] for e in result["examples"]["hs_fails_rw_succeeds"]] == [5]
    example = result["examples"]["both_fail"][0]
    assert example == {
        "index": 0, "sentence1": "a", "sentence2": "A", "gold": 0.0, "sim_hs": 5.0, "sim_rw": 2.0,
        "rank_error_hs": 1.0, "rank_error_rw": pytest.approx(0.4),
    }
    assert result["spearman"]["hs"] == pytest.approx(spearman(SIM_HS, GOLD))


def test_error_analysis_threshold_is_strict():
    # At 0.4 RW's errors of exactly 0.4 are no failures: only pair 1 (0.6) fails for RW.
    at = error_analysis(SIM_HS, SIM_RW, GOLD, threshold=0.4)
    assert at["counts"]["rw_fails"] == 1
    assert at["counts"]["hs_succeeds_rw_fails"] == 1 and at["counts"]["both_fail"] == 0
    below = error_analysis(SIM_HS, SIM_RW, GOLD, threshold=0.39)
    assert below["counts"]["rw_fails"] == 4
    zero = error_analysis(SIM_HS, SIM_RW, GOLD, threshold=0.0)
    assert zero["counts"]["rw_fails"] == 5 and zero["counts"]["hs_fails"] == 2  # every non-zero error
    # Threshold 1: nothing can fail, the shares are undefined.
    none = error_analysis(SIM_HS, SIM_RW, GOLD, threshold=1.0)
    assert none["failing_pairs"] == 0 and none["shares"] == {g: None for g in analysis.ERROR_GROUPS}
    for bad in (-0.1, 1.5, "0.2"):
        with pytest.raises(InputError, match="threshold"):
            error_analysis(SIM_HS, SIM_RW, GOLD, threshold=bad)
    with pytest.raises(InputError, match="show"):
        error_analysis(SIM_HS, SIM_RW, GOLD, show=-1)
    with pytest.raises(InputError, match="one value per pair"):
        error_analysis(SIM_HS, SIM_RW[:5], GOLD)


# --------------------------------------------------------------------------- pair sampling


@pytest.mark.parametrize("n", [2, 3, 7, 40])
def test_pair_index_enumerates_pairs_in_order(n):
    first, second = pair_index(np.arange(n * (n - 1) // 2), n)
    expected = np.triu_indices(n, k=1)
    np.testing.assert_array_equal(first, expected[0])
    np.testing.assert_array_equal(second, expected[1])


def test_pair_index_large_n_and_pair_sample():
    n = 200_001
    total = n * (n - 1) // 2
    k = np.array([0, 1, n - 2, n - 1, total // 2, total - 2, total - 1])
    i, j = pair_index(k, n)
    np.testing.assert_array_equal(i * (2 * n - i - 1) // 2 + (j - i - 1), k)
    assert np.all(i < j) and np.all(j < n)
    first, second = pair_sample(5, 100)
    assert len(first) == 10  # all pairs when there are fewer than asked
    a = pair_sample(1000, 500, seed=3)
    b = pair_sample(1000, 500, seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert len(set(zip(a[0].tolist(), a[1].tolist()))) == 500 and np.all(a[0] < a[1])


# --------------------------------------------------------------------------- on a small random checkpoint

PAIRS = Pairs(
    first=["A man plays a guitar.", "The stock fell.", "A cat sleeps.", "It rains.", "He bought a car.", "A dog runs.", "A cat sleeps."],
    second=["Someone plays music.", "Shares dropped.", "A kitten naps.", "It is sunny.", "He purchased a vehicle.", "Budget approved.", "A dog runs."],
    scores=[4.2, 4.5, 4.0, 1.0, 4.3, 0.0, 1.5],
)
TEXTS = [
    "A man plays a guitar.", "Someone plays music.", "The stock fell.", "Shares dropped.",
    "A cat sleeps.", "A kitten naps.", "It rains.", "It is sunny.", "A cat sleeps.",
]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("analysis") / "olmoe"
    write_random_checkpoint(directory, SMALL_CONFIGS["olmoe"], seed=5)
    yield MoEEmbedder.from_pretrained(directory, dtype=torch.float32)
    torch.set_num_threads(threads)


def cosines(embedder, first, second, kind, prompt=None):
    return cosine_rows(embedder.encode(list(first), kind=kind, prompt=prompt), embedder.encode(list(second), kind=kind, prompt=prompt))


def test_prompt_robustness_on_a_checkpoint(embedder):
    prompts = ["none", "prompteol", "sentiment"]
    result = prompt_robustness(embedder, PAIRS, prompts)
    p = len(prompts)
    assert result["prompts"] == prompts and result["pairs"] == len(PAIRS)
    assert result["labels"] == [f"HS:{n}" for n in prompts] + [f"RW:{n}" for n in prompts]
    matrix = np.array(result["matrix"])
    assert matrix.shape == (2 * p, 2 * p)
    np.testing.assert_array_equal(np.diag(matrix), 1.0)
    np.testing.assert_allclose(matrix, matrix.T)
    # The matrix from similarities computed independently with encode().
    vectors = [cosines(embedder, PAIRS.first, PAIRS.second, "hs", n) for n in prompts]
    vectors += [cosines(embedder, PAIRS.first, PAIRS.second, "rw", n) for n in prompts]
    np.testing.assert_allclose(matrix, spearman_matrix(np.stack(vectors)), atol=1e-6)
    # Block means recomputed by hand from the matrix.
    rw_rw = [matrix[p + i, p + j] for i in range(p) for j in range(p) if i != j]
    hs_hs = [matrix[i, j] for i in range(p) for j in range(p) if i != j]
    hs_rw = [matrix[i, p + j] for i in range(p) for j in range(p)]
    assert result["block_means"]["rw_rw"] == pytest.approx(sum(rw_rw) / len(rw_rw))
    assert result["block_means"]["hs_hs"] == pytest.approx(sum(hs_hs) / len(hs_hs))
    assert result["block_means"]["hs_rw"] == pytest.approx(sum(hs_rw) / len(hs_rw))
    # Per-prompt Spearman against gold, and its spread.
    gold = result["gold"]
    for i, name in enumerate(prompts):
        assert gold["hs"][name] == pytest.approx(spearman(vectors[i], PAIRS.scores), abs=1e-6)
        assert gold["rw"][name] == pytest.approx(spearman(vectors[p + i], PAIRS.scores), abs=1e-6)
    rw_scores = np.array(list(gold["rw"].values()))
    assert gold["summary"]["rw"]["mean"] == pytest.approx(rw_scores.mean())
    assert gold["summary"]["rw"]["variance"] == pytest.approx(rw_scores.var())


def test_prompt_robustness_without_scores_and_bad_prompts(embedder):
    unscored = Pairs(PAIRS.first, PAIRS.second, None)
    result = prompt_robustness(embedder, unscored, ["none", "tone"])
    assert result["gold"] is None and np.array(result["matrix"]).shape == (4, 4)
    with pytest.raises(InputError, match="repeated"):
        prompt_robustness(embedder, unscored, ["none", "none"])
    with pytest.raises(InputError, match="unknown prompt"):
        prompt_robustness(embedder, unscored, ["no-such-prompt"])


def test_complementarity_on_a_checkpoint(embedder):
    needs_sklearn()
    result = complementarity(embedder, TEXTS, 3, seed=0)
    n = len(TEXTS)
    assert result["texts"] == n and result["clusters"] == 3
    assert sum(result["cluster_sizes"]["hs"]) == n == sum(result["cluster_sizes"]["rw"])
    assert result["sampled_pairs"] == result["total_pairs"] == n * (n - 1) // 2
    for key in ("ami", "nmi", "jaccard", "exact_match"):
        assert -1 <= result["agreement"][key] <= 1
    assert result["agreement"]["exact_match"] >= 1 / 3  # the best matching is at least the mean over all matchings, n/k
    # The similarity Spearman over all pairs, recomputed with encode().
    hs, rw = embedder.encode(TEXTS, kind="hs"), embedder.encode(TEXTS, kind="rw")
    first, second = np.triu_indices(n, k=1)
    expected = spearman(cosine_rows(hs[first], hs[second]), cosine_rows(rw[first], rw[second]))
    assert result["similarity_spearman"] == pytest.approx(expected, abs=1e-6)
    # The agreement of the clusterings recomputed from the same k-means.
    labels_hs, _ = analysis.kmeans_labels(hs, 3, 0)
    labels_rw, _ = analysis.kmeans_labels(rw, 3, 0)
    assert result["agreement"] == pytest.approx(clustering_agreement(labels_hs, labels_rw))
    # Deterministic, and a sample of pairs when asked for fewer.
    assert complementarity(embedder, TEXTS, 3, seed=0) == result
    assert complementarity(embedder, TEXTS, 3, seed=0, sample_pairs=10)["sampled_pairs"] == 10
    with pytest.raises(InputError, match="cannot make 20 clusters"):
        complementarity(embedder, TEXTS, 20)
    with pytest.raises(InputError, match=">= 2"):
        complementarity(embedder, TEXTS, 1)
    with pytest.raises(InputError, match="seed"):
        complementarity(embedder, TEXTS, 2, seed=-1)


def test_error_analysis_on_a_checkpoint(embedder):
    result = error_analysis_for_pairs(embedder, PAIRS, threshold=0.2, show=3)
    sim_hs = cosines(embedder, PAIRS.first, PAIRS.second, "hs")
    sim_rw = cosines(embedder, PAIRS.first, PAIRS.second, "rw")
    fail_hs = np.abs(rank_errors(sim_hs, PAIRS.scores)) > 0.2
    fail_rw = np.abs(rank_errors(sim_rw, PAIRS.scores)) > 0.2
    assert result["counts"]["hs_fails"] == fail_hs.sum() and result["counts"]["rw_fails"] == fail_rw.sum()
    assert result["failing_pairs"] == (fail_hs | fail_rw).sum()
    assert result["counts"]["both_fail"] == (fail_hs & fail_rw).sum()
    if result["failing_pairs"]:
        assert sum(result["shares"].values()) == pytest.approx(1.0)
    for group, examples in result["examples"].items():
        assert len(examples) == min(3, result["counts"][group])
        for example in examples:
            i = example["index"]
            assert (example["sentence1"], example["sentence2"]) == (PAIRS.first[i], PAIRS.second[i])
            assert example["sim_hs"] == pytest.approx(sim_hs[i], abs=1e-6)
    assert result["prompt"] == "none"
    with pytest.raises(InputError, match="gold scores"):
        error_analysis_for_pairs(embedder, Pairs(PAIRS.first, PAIRS.second, None))
