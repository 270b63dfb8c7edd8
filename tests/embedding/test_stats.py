import warnings

import numpy as np
import pytest
from scipy import stats as scipy_stats

from moee_ref.errors import InputError
from moee_ref.embedding.stats import cosine_rows, pearson, rankdata, spearman

SEEDS = [0, 1, 2, 3, 4]


def tied_samples(seed, n=60, levels=5):
    """Two integer-valued samples with many ties, plus a float one."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, levels, size=n).astype(float)
    b = (a + rng.integers(0, levels, size=n)).astype(float)
    c = rng.normal(size=n)
    return a, b, c


@pytest.mark.parametrize("seed", SEEDS)
def test_rankdata_matches_scipy_average_ranks(seed):
    a, b, c = tied_samples(seed)
    for values in (a, b, c):
        np.testing.assert_array_equal(rankdata(values), scipy_stats.rankdata(values, method="average"))


def test_rankdata_hand_example():
    np.testing.assert_array_equal(rankdata([10, 20, 10, 30, 20, 20]), [1.5, 4.0, 1.5, 6.0, 4.0, 4.0])


@pytest.mark.parametrize("seed", SEEDS)
def test_spearman_matches_scipy_with_ties(seed):
    a, b, c = tied_samples(seed)
    for x, y in ((a, b), (a, c), (b, c)):
        assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_pearson_matches_scipy(seed):
    a, b, c = tied_samples(seed)
    for x, y in ((a, b), (a, c), (b, c)):
        assert pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x, y).statistic, abs=1e-12)


def test_hand_computed_correlations():
    # Ranks [1,2,3] vs [3,1,2]: sum d^2 = 6, rho = 1 - 6*6/(3*8) = -0.5.
    assert spearman([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [6, 4, 2]) == pytest.approx(-1.0)
    # Spearman sees only order: a monotone transform keeps it at 1.
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)


def test_constant_input_gives_nan_like_scipy():
    constant, varying = [2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 5.0]
    assert np.isnan(spearman(constant, varying))
    assert np.isnan(pearson(varying, constant))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(scipy_stats.spearmanr(constant, varying).statistic)


@pytest.mark.parametrize("function", [spearman, pearson])
def test_correlation_input_validation(function):
    with pytest.raises(InputError, match="same length"):
        function([1, 2, 3], [1, 2])
    with pytest.raises(InputError, match="at least 2"):
        function([1.0], [2.0])
    with pytest.raises(InputError, match="NaN"):
        function([1, np.nan, 3], [1, 2, 3])
    with pytest.raises(InputError, match="one-dimensional"):
        function([[1, 2], [3, 4]], [[1, 2], [3, 4]])


def test_cosine_rows_hand_values():
    a = np.array([[1.0, 0.0], [1.0, 2.0], [3.0, 4.0]])
    b = np.array([[1.0, 1.0], [-2.0, -4.0], [6.0, 8.0]])
    np.testing.assert_allclose(cosine_rows(a, b), [1 / np.sqrt(2), -1.0, 1.0], rtol=0, atol=1e-15)


def test_cosine_rows_zero_vector_gives_zero_not_nan():
    a = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    b = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    result = cosine_rows(a, b)
    np.testing.assert_array_equal(result, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("seed", SEEDS)
def test_cosine_rows_matches_scipy_distance(seed):
    from scipy.spatial.distance import cosine as cosine_distance

    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(20, 16)), rng.normal(size=(20, 16))
    expected = [1.0 - cosine_distance(row_a, row_b) for row_a, row_b in zip(a, b)]
    np.testing.assert_allclose(cosine_rows(a, b), expected, rtol=0, atol=1e-12)
    # Scaling a row does not change its cosine.
    np.testing.assert_allclose(cosine_rows(a * 1e3, b * 1e-3), expected, rtol=0, atol=1e-12)


def test_cosine_rows_validation():
    with pytest.raises(InputError):
        cosine_rows(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(InputError):
        cosine_rows(np.ones(3), np.ones(3))
    with pytest.raises(InputError):
        cosine_rows(np.array([[np.nan, 1.0]]), np.ones((1, 2)))
