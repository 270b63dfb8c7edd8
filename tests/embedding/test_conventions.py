"""MoEEmbedder's sentence-transformers conventions (issue 32): truncate_dim on two-part kinds, similarity_fn_name,
tensors in -> tensors out, precision=None, plain-prefix prompts, device / .to(), a settable max_seq_length."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embed_fixtures import TEXTS, build_embedder
from moee_ref.embedding.conventions import SIMILARITY_FNS
from moee_ref.errors import InputError


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    return build_embedder(tmp_path_factory, "olmoe", seed=21)


@pytest.fixture
def fresh(olmoe):
    """olmoe with its settable conventions restored after the test."""
    yield olmoe
    olmoe.similarity_fn_name = "cosine"
    olmoe.max_seq_length = None


def test_truncate_dim_is_refused_below_the_width_of_two_part_kinds(olmoe, monkeypatch):
    texts = TEXTS[:3]
    width = olmoe.dimension("moee-sum")
    full = olmoe.encode(texts, "moee-sum")
    assert np.array_equal(olmoe.encode(texts, "moee-sum", truncate_dim=width), full)  # the whole width: nothing cut
    monkeypatch.setattr(type(olmoe), "features", lambda *a, **k: pytest.fail("ran the model"))
    for kind in ("moee-sum", "moee-concat"):
        with pytest.raises(InputError, match=rf"^truncate_dim=64 is refused for kind '{kind}': its vectors are \[HS; RW\] side "
                                             rf"by side, so keeping the first 64 of {width} columns drops the routing weights"):
            olmoe.encode(texts, kind, truncate_dim=64)
    with pytest.raises(InputError, match=r"^truncate_dim must be an integer in \[1, 64\] \(this kind's width\), got 65$"):
        olmoe.encode(texts, "hs", truncate_dim=65)


def by_hand(a, b, name):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if name == "cosine":
        return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    if name == "dot":
        return a @ b.T
    order = 2 if name == "euclidean" else 1
    return -np.array([[np.linalg.norm(x - y, ord=order) for y in b] for x in a])


@pytest.mark.parametrize("name", SIMILARITY_FNS)
def test_similarity_fn_name_is_honoured_numpy_and_tensors(fresh, name):
    a, b = fresh.encode(TEXTS[:3], "moee-concat"), fresh.encode(TEXTS[3:7], "moee-concat")
    fresh.similarity_fn_name = name
    scores = fresh.similarity(a, b)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.shape == (3, 4)
    np.testing.assert_allclose(scores, by_hand(a, b, name), rtol=1e-5, atol=1e-5)
    tensor = fresh.similarity(torch.from_numpy(a), b)  # a tensor in: a tensor out, .topk works
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and np.array_equal(tensor.numpy(), scores)
    assert tensor.topk(2, dim=1).indices.shape == (3, 2)
    pairs = fresh.similarity_pairwise(torch.from_numpy(a), torch.from_numpy(b[:3]))
    assert isinstance(pairs, torch.Tensor)
    np.testing.assert_allclose(pairs.numpy(), np.diag(by_hand(a, b[:3], name)), rtol=1e-5, atol=1e-5)
    st_util = pytest.importorskip("sentence_transformers.util")
    theirs = {"cosine": st_util.cos_sim, "dot": st_util.dot_score, "euclidean": st_util.euclidean_sim,
              "manhattan": st_util.manhattan_sim}[name]
    np.testing.assert_allclose(scores, theirs(a, b).numpy(), rtol=1e-5, atol=1e-4)


def test_similarity_fn_name_checks_and_takes_the_st_enum(fresh):
    with pytest.raises(InputError, match=r"^similarity_fn_name must be one of cosine, dot, euclidean, manhattan, got 'cos'$"):
        fresh.similarity_fn_name = "cos"
    assert fresh.similarity_fn_name == "cosine"
    st = pytest.importorskip("sentence_transformers")
    fresh.similarity_fn_name = st.SimilarityFunction.DOT_PRODUCT
    assert fresh.similarity_fn_name == "dot"


def test_precision_none_is_float32(olmoe):
    assert np.array_equal(olmoe.encode(TEXTS[:2], "hs", precision=None), olmoe.encode(TEXTS[:2], "hs"))


def test_a_plain_prefix_is_a_prompt(olmoe):
    texts = TEXTS[:3]
    assert np.array_equal(olmoe.encode(texts, "hs", prompt="query: "), olmoe.encode(texts, "hs", prompt="query: {text}"))
    assert np.array_equal(olmoe.encode(texts, "hs", prompt=""), olmoe.encode(texts, "hs"))  # an empty prefix: none
    with pytest.raises(InputError, match=r"^unknown prompt 'queryy': it is not a built-in name"):
        olmoe.encode(texts, "hs", prompt="queryy")  # one bare word is a mistyped name, not a prefix


def test_device_and_to(olmoe):
    assert olmoe.device == torch.device("cpu")
    assert olmoe.to("cpu") is olmoe and olmoe.device == torch.device("cpu")
    with pytest.raises(InputError, match=r"^device 'meta' is not supported; use auto, cpu, cuda or cuda:N$"):
        olmoe.to("meta")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match=r"^device 'cuda' was asked for, but this torch sees no CUDA device"):
            olmoe.to("cuda")


def test_max_seq_length_is_settable(fresh):
    texts = TEXTS[:3]
    assert fresh.max_seq_length == fresh.args.max_position_embeddings
    fresh.max_seq_length = 6
    assert fresh.max_seq_length == 6
    with pytest.raises(InputError, match=r"text\(s\) exceed max_length=6 tokens"):
        fresh.encode(texts, "hs")
    cut = fresh.encode(texts, "hs", truncation="right")
    assert np.array_equal(cut, fresh.encode(texts, "hs", max_length=6, truncation="right"))
    fresh.max_seq_length = None
    assert fresh.max_seq_length == fresh.args.max_position_embeddings
    assert not np.array_equal(fresh.encode(texts, "hs", truncation="right"), cut)
    limit = fresh.args.max_position_embeddings
    with pytest.raises(InputError, match=rf"^max_seq_length must be an integer in \[1, {limit}\] .* or None, got 0$"):
        fresh.max_seq_length = 0
