import zipfile

import numpy as np
import pytest

from moee_ref.errors import InputError
from moee_ref.embedding.standardize import FORMAT_VERSION, Standardizer, standardize_per_batch


@pytest.fixture
def corpus():
    rng = np.random.default_rng(0)
    # Features on very different scales and offsets, as router logits are.
    return rng.normal(size=(50, 6)) * np.array([1e-3, 1.0, 5.0, 100.0, 0.5, 2.0]) + np.arange(6) * 10.0


# --- fit / transform -------------------------------------------------------


def test_fit_transform_gives_zero_mean_unit_std_on_fit_data(corpus):
    standardized = Standardizer.fit(corpus, kind="rw:test").transform(corpus)
    assert standardized.dtype == np.float32
    np.testing.assert_allclose(standardized.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(standardized.std(axis=0, ddof=1), 1.0, rtol=1e-5)


def test_fit_stores_mean_and_sample_std(corpus):
    fitted = Standardizer.fit(corpus)
    np.testing.assert_allclose(fitted.mean, corpus.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(fitted.std, corpus.std(axis=0, ddof=1), rtol=1e-12)


def test_transform_of_new_data_uses_fitted_statistics_only():
    fitted = Standardizer(mean=np.array([1.0, -2.0]), std=np.array([2.0, 0.5]), eps=0.5)
    # (3 - 1) / (2 + 0.5) = 0.8 and (-1 + 2) / (0.5 + 0.5) = 1.
    np.testing.assert_allclose(fitted.transform([[3.0, -1.0]]), [[0.8, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(fitted.transform([3.0, -1.0]), [0.8, 1.0], rtol=1e-6)


def test_fitting_on_a_batch_matches_per_batch_standardization(corpus):
    np.testing.assert_allclose(
        Standardizer.fit(corpus).transform(corpus), standardize_per_batch(corpus), rtol=1e-6, atol=1e-6
    )


def test_width_mismatch_names_both_widths_and_kind(corpus):
    fitted = Standardizer.fit(corpus, kind="rw:olmoe")
    with pytest.raises(InputError) as caught:
        fitted.transform(np.zeros((2, 4)))
    message = str(caught.value)
    assert "4" in message and "6" in message and "rw:olmoe" in message


@pytest.mark.parametrize(
    "bad_input",
    [np.ones((1, 3)), np.ones(3), np.array([[1.0, np.nan], [2.0, 3.0]]), np.array([[1.0, np.inf], [2.0, 3.0]])],
)
def test_fit_rejects_bad_input(bad_input):
    with pytest.raises(InputError):
        Standardizer.fit(bad_input)


def test_constructor_rejects_inconsistent_statistics():
    with pytest.raises(InputError):
        Standardizer(mean=np.zeros(3), std=np.ones(2))
    with pytest.raises(InputError):
        Standardizer(mean=np.zeros(2), std=np.array([1.0, -1.0]))
    with pytest.raises(InputError):
        Standardizer(mean=np.zeros(2), std=np.ones(2), eps=0.0)


# --- save / load -------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path, corpus):
    fitted = Standardizer.fit(corpus, kind="moee:qwen", eps=1e-6)
    path = tmp_path / "stats.npz"
    fitted.save(path)
    loaded = Standardizer.load(path)
    np.testing.assert_array_equal(loaded.mean, fitted.mean)
    np.testing.assert_array_equal(loaded.std, fitted.std)
    assert loaded.mean.dtype == fitted.mean.dtype
    assert loaded.kind == "moee:qwen"
    assert loaded.eps == 1e-6
    np.testing.assert_array_equal(loaded.transform(corpus), fitted.transform(corpus))


def test_save_writes_exactly_the_given_path(tmp_path, corpus):
    path = tmp_path / "stats.bin"
    Standardizer.fit(corpus).save(path)
    assert path.is_file()
    assert not (tmp_path / "stats.bin.npz").exists()
    assert Standardizer.load(path).width == corpus.shape[1]


def test_load_missing_file(tmp_path):
    with pytest.raises(InputError, match="no standardizer file"):
        Standardizer.load(tmp_path / "absent.npz")


def test_load_rejects_a_file_that_is_not_npz(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("mean,std\n1,2\n")
    with pytest.raises(InputError, match="not a readable"):
        Standardizer.load(path)


def test_load_rejects_a_truncated_archive(tmp_path, corpus):
    path = tmp_path / "stats.npz"
    Standardizer.fit(corpus).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(InputError):
        Standardizer.load(path)


def test_load_rejects_a_single_npy_array(tmp_path):
    path = tmp_path / "mean.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(InputError, match=".npy"):
        Standardizer.load(path)


def test_load_rejects_wrong_keys(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(InputError, match="missing") as caught:
        Standardizer.load(path)
    assert "mean" in str(caught.value)


def test_load_rejects_unknown_version(tmp_path, corpus):
    path = tmp_path / "future.npz"
    np.savez(
        path,
        format_version=np.int64(FORMAT_VERSION + 1),
        kind=np.str_(""),
        eps=np.float64(1e-8),
        mean=np.zeros(2),
        std=np.ones(2),
    )
    with pytest.raises(InputError, match="version"):
        Standardizer.load(path)


def test_load_refuses_pickled_contents(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(
        path,
        format_version=np.int64(FORMAT_VERSION),
        kind=np.array(["x"], dtype=object),  # object arrays are stored with pickle
        eps=np.float64(1e-8),
        mean=np.zeros(2),
        std=np.ones(2),
    )
    assert zipfile.is_zipfile(path)
    with pytest.raises(InputError):
        Standardizer.load(path)


def test_load_rejects_inconsistent_statistics(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(
        path,
        format_version=np.int64(FORMAT_VERSION),
        kind=np.str_("rw"),
        eps=np.float64(1e-8),
        mean=np.zeros(3),
        std=np.ones(2),
    )
    with pytest.raises(InputError, match="invalid statistics"):
        Standardizer.load(path)


# --- the authors' per-batch version ------------------------------------------


def test_per_batch_hand_computation():
    batch = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0]])
    # Column 0: mean 3, sample std sqrt((4 + 0 + 4) / 2) = 2.
    # Column 1: mean 4, deviations -2, -2, 4, sample std sqrt(24 / 2) = sqrt(12).
    root12 = np.sqrt(12.0)
    expected = np.array([[-1.0, -2 / root12], [0.0, -2 / root12], [1.0, 4 / root12]])
    result = standardize_per_batch(batch)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-6)


def test_per_batch_matches_the_authors_torch_formula():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    batch = rng.normal(size=(7, 5)) * 3.0 + 1.0
    tensor = torch.from_numpy(batch)
    mean = tensor.mean(dim=0, keepdim=True)
    std = tensor.std(dim=0, keepdim=True)  # torch's default: sample std
    expected = ((tensor - mean) / (std + 1e-8)).numpy()
    np.testing.assert_allclose(standardize_per_batch(batch), expected, rtol=1e-6, atol=1e-6)


def test_per_batch_single_row_becomes_zeros():
    # Sample std of one row is undefined (NaN in torch); NaN is then replaced by 0.
    np.testing.assert_array_equal(standardize_per_batch(np.array([[1.0, -4.0, 9.0]])), np.zeros((1, 3)))


def test_per_batch_nan_column_becomes_zeros_others_untouched():
    batch = np.array([[1.0, np.nan], [3.0, 1.0]])
    result = standardize_per_batch(batch)
    np.testing.assert_array_equal(result[:, 1], [0.0, 0.0])
    # Column 0: mean 2, sample std sqrt(2).
    np.testing.assert_allclose(result[:, 0], [-1 / np.sqrt(2), 1 / np.sqrt(2)], rtol=1e-6)


def test_per_batch_constant_column_is_zero_not_nan():
    result = standardize_per_batch(np.array([[5.0, 1.0], [5.0, 2.0], [5.0, 4.0]]))
    np.testing.assert_array_equal(result[:, 0], [0.0, 0.0, 0.0])


@pytest.mark.parametrize("bad_batch", [np.zeros((0, 3)), np.zeros(3), np.zeros((2, 2, 2))])
def test_per_batch_rejects_bad_shapes(bad_batch):
    with pytest.raises(InputError):
        standardize_per_batch(bad_batch)
