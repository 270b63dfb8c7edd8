"""MoEE as a real sentence-transformers model (moee_ref.st): every use against MoEEmbedder.encode."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

st = pytest.importorskip("sentence_transformers")

from scipy.stats import pearsonr, spearmanr  # noqa: E402  (sentence-transformers depends on scipy)
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.evaluation import (  # noqa: E402
    EmbeddingSimilarityEvaluator, InformationRetrievalEvaluator,
)

import moee_ref.st as moee_st  # noqa: E402
from embed_fixtures import single_thread  # noqa: E402, F401  (one torch thread for this module)
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint  # noqa: E402
from moee_ref.embedding.embedder import MoEEmbedder  # noqa: E402
from moee_ref.errors import CheckpointError, InputError, UnknownOptionError  # noqa: E402
from moee_ref.st import MoEE  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Rain is expected tomorrow.",
    "Hidden states can serve as sentence embeddings without fine-tuning, the paper says.",
    "Cats sleep.",
    "The museum displays paintings, sculptures and ancient manuscripts.",
    "Water boils at one hundred degrees Celsius at sea level.",
]
PROMPTS = {"query": "query: ", "document": "prompteol", "t": "Topic of {text} ."}
SETTINGS = dict(prompt="prompteol", alpha=0.5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("st") / "olmoe", SMALL_CONFIGS["olmoe"], seed=31)


@pytest.fixture(scope="module")
def embedder(checkpoint):
    return MoEEmbedder.from_pretrained(checkpoint, dtype=torch.float32, batch_size=4, prompts=PROMPTS)


@pytest.fixture(scope="module")
def model(embedder):
    return SentenceTransformer(modules=[MoEE(embedder, "moee-sum", **SETTINGS)], prompts=PROMPTS)


def close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["hs", "rw", "moee-concat", "moee-sum"])
def test_encode_equals_moee_embedder(embedder, kind):
    model = SentenceTransformer(modules=[MoEE(embedder, kind, **SETTINGS)])
    close(model.encode(TEXTS, batch_size=2), embedder.encode(TEXTS, kind, **SETTINGS))
    assert model.get_embedding_dimension() == embedder.dimension(kind)
    close(model.encode(TEXTS[1]), embedder.encode(TEXTS[1], kind, **SETTINGS))  # one text: one vector


def test_prompts_query_document_and_options(model, embedder):
    # sentence-transformers' prompt replaces the module's own, as prompt_name does in MoEEmbedder.encode
    close(model.encode_query(TEXTS), embedder.encode_query(TEXTS, alpha=0.5))  # "query: " is a prefix
    close(model.encode_document(TEXTS), embedder.encode_document(TEXTS, alpha=0.5))  # a built-in name
    close(model.encode(TEXTS, prompt_name="t"), embedder.encode(TEXTS, prompt_name="t", alpha=0.5))  # a template
    close(model.encode(TEXTS, prompt="passage: "), embedder.encode(TEXTS, prompt="passage: ", alpha=0.5))
    close(model.encode(TEXTS, normalize_embeddings=True), embedder.encode(TEXTS, normalize_embeddings=True, **SETTINGS))
    tensor = model.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    ours = embedder.encode(TEXTS, precision="int8", **SETTINGS)
    assert np.array_equal(model.encode(TEXTS, precision="int8"), ours)


@pytest.mark.parametrize("name", ["cosine", "dot", "euclidean", "manhattan"])
def test_similarity_function_equals_moee_embedder(embedder, name):
    model = SentenceTransformer(modules=[MoEE(embedder, "moee-concat")], similarity_fn_name=name)
    a, b = model.encode(TEXTS[:3]), model.encode(TEXTS[3:])
    embedder.similarity_fn_name = name
    try:
        np.testing.assert_allclose(model.similarity(a, b).numpy(), embedder.similarity(a, b), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(model.similarity_pairwise(a, b).numpy(), embedder.similarity_pairwise(a, b), rtol=1e-5, atol=1e-4)
    finally:
        embedder.similarity_fn_name = "cosine"


def test_similarity_evaluator_scores_as_by_hand(model, embedder):
    first, second = TEXTS[:3] + TEXTS[3:5], TEXTS[3:] + TEXTS[:2]
    gold = [0.1, 0.9, 0.4, 0.7, 0.2]
    scores = EmbeddingSimilarityEvaluator(first, second, gold, name="local", batch_size=2)(model)
    a, b = embedder.encode(first, **SETTINGS), embedder.encode(second, **SETTINGS)
    cosine = [float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b)]
    assert scores["local_spearman_cosine"] == pytest.approx(spearmanr(gold, cosine)[0], abs=1e-6)
    assert scores["local_pearson_cosine"] == pytest.approx(pearsonr(gold, cosine)[0], abs=1e-5)


def test_retrieval_evaluator_scores_as_by_hand(model, embedder):
    queries = {"q0": "fox and dog", "q1": "weather tomorrow", "q2": "boiling water"}
    corpus = {f"d{i}": text for i, text in enumerate(TEXTS)}
    relevant = {"q0": {"d0"}, "q1": {"d1", "d3"}, "q2": {"d5"}}
    scores = InformationRetrievalEvaluator(queries, corpus, relevant, name="ir", accuracy_at_k=[1, 3], mrr_at_k=[10],
                                           precision_recall_at_k=[1], ndcg_at_k=[10], map_at_k=[10], batch_size=2)(model)
    q = embedder.encode_query(list(queries.values()), alpha=0.5)
    d = embedder.encode_document(list(corpus.values()), alpha=0.5)
    ranking = np.argsort(-embedder.similarity(q, d), axis=1, kind="stable")
    hits = [[f"d{j}" in relevant[name] for j in row] for name, row in zip(queries, ranking)]
    assert scores["ir_cosine_accuracy@1"] == pytest.approx(np.mean([h[0] for h in hits]))
    assert scores["ir_cosine_accuracy@3"] == pytest.approx(np.mean([any(h[:3]) for h in hits]))
    assert scores["ir_cosine_mrr@10"] == pytest.approx(np.mean([1 / (h.index(True) + 1) for h in hits]))


def test_save_and_load_bit_for_bit_without_pickle(model, embedder, tmp_path):
    expected = model.encode(TEXTS)
    model.save(str(tmp_path / "saved"))
    saved = tmp_path / "saved"
    assert not [p.name for p in saved.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pickle", ".safetensors")]
    config = json.loads((saved / moee_st.CONFIG_FILE).read_text())
    assert config["checkpoint"] == str(Path(embedder.model.source_dir).resolve()) and config["kind"] == "moee-sum"
    assert config["alpha"] == 0.5 and config["dtype"] == "float32" and config["prompt"] == "prompteol"
    loaded = moee_st.load(saved)
    assert np.array_equal(loaded.encode(TEXTS), expected)
    assert loaded.prompts["query"] == "query: " and loaded.similarity_fn_name == "cosine"
    assert np.array_equal(loaded.encode_query(TEXTS), model.encode_query(TEXTS))
    # sentence-transformers 6 imports a class outside its namespace only when trusted (for local folders too)
    with pytest.raises(ValueError, match=r"(?s)references the module class 'moee_ref.st.MoEE', which is not part of "
                                         r"Sentence Transformers.*trust_remote_code=True"):
        SentenceTransformer(str(saved))
    trusted = SentenceTransformer(str(saved), trust_remote_code=True)
    assert np.array_equal(trusted.encode(TEXTS), expected)


def test_save_with_a_copy_of_the_checkpoint_and_standardizers(embedder, tmp_path):
    standardizer = embedder.fit_standardizer(TEXTS, "rw", rw_layers=[1])
    model = SentenceTransformer(modules=[MoEE(embedder, "moee-sum", alpha=2.0, standardizer=standardizer, copy_checkpoint=True,
                                              rw_layers=[1], max_length=64, truncation="right")])
    expected = model.encode(TEXTS)
    close(expected, embedder.encode(TEXTS, "moee-sum", alpha=2.0, standardizer=standardizer, rw_layers=[1], max_length=64,
                                    truncation="right"))
    model.save(str(tmp_path / "saved"))
    moved = tmp_path / "moved"
    (tmp_path / "saved").rename(moved)  # the folder stands alone
    config = json.loads((moved / moee_st.CONFIG_FILE).read_text())
    assert config["checkpoint"] is None and config["checkpoint_copied"] == "checkpoint"
    assert config["standardizers"] == ["standardizer_rw.npz"] and (moved / "standardizer_rw.npz").is_file()
    loaded = moee_st.load(moved)
    assert np.array_equal(loaded.encode(TEXTS), expected)
    assert loaded[0].embedder.model.source_dir == (moved / "checkpoint").resolve()


def test_a_changed_checkpoint_is_refused(checkpoint, tmp_path):
    other = write_random_checkpoint(tmp_path / "other", SMALL_CONFIGS["olmoe"], seed=32)
    SentenceTransformer(modules=[MoEE(other, "hs", dtype="float32")]).save(str(tmp_path / "saved"))
    config_file = tmp_path / "saved" / moee_st.CONFIG_FILE
    config = json.loads(config_file.read_text())
    config["checkpoint"] = str(checkpoint)  # another checkpoint of the same shape at the pointer
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"^the checkpoint at .* is not the one this model was saved with"):
        moee_st.load(tmp_path / "saved")


LOAD_AND_LIST = """
import json, sys
import sentence_transformers, moee_ref  # what the user has imported
import moee_ref.st
found = {}
for how in ("moee", "trusted"):
    before = set(sys.modules)
    if how == "moee":
        model = moee_ref.st.load(sys.argv[1])
    else:
        model = sentence_transformers.SentenceTransformer(sys.argv[1], trust_remote_code=True)
    model.encode(["a text"])
    new = sorted(set(sys.modules) - before)
    found[how] = {"new": new, "files": [getattr(sys.modules[name], "__file__", None) or "" for name in new]}
print(json.dumps(found))
"""


def test_loading_imports_nothing_outside_st_and_moee_ref(model, tmp_path):
    """Both ways of loading a saved model, in a fresh interpreter that has imported sentence_transformers and moee_ref:
    nothing else is imported, and no code from the saved folder."""
    model.save(str(tmp_path / "saved"))
    out = subprocess.run([sys.executable, "-c", LOAD_AND_LIST, str(tmp_path / "saved")], capture_output=True, text=True,
                         timeout=300, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for how, found in json.loads(out.stdout.strip().splitlines()[-1]).items():
        outside = [name for name in found["new"] if name.split(".")[0] not in ("moee_ref", "sentence_transformers")]
        assert not outside, (how, outside)
        assert not [f for f in found["files"] if str(tmp_path) in f], how


def test_multi_process_pool(model):
    """One CPU worker (it loads the checkpoint again); bounded: a worker that dies would leave encode waiting."""
    pool = model.start_multi_process_pool(["cpu"])
    found = {}
    worker = threading.Thread(target=lambda: found.update(vectors=model.encode(TEXTS, pool=pool, batch_size=2, chunk_size=3)),
                              daemon=True)
    try:
        worker.start()
        worker.join(timeout=240)
    finally:
        model.stop_multi_process_pool(pool)
    assert "vectors" in found, "the pool gave no result in 240 s"
    close(found["vectors"], model.encode(TEXTS))  # the worker's own threads: float32 rounding


def test_device_max_seq_length_and_to(model, embedder):
    assert model.device == torch.device("cpu") and model.to("cpu") is model
    assert model.max_seq_length == embedder.args.max_position_embeddings
    with pytest.raises(InputError, match=r"^MoEE computes in the dtype its checkpoint was loaded with"):
        model.half()
    short = SentenceTransformer(modules=[MoEE(embedder, "hs", truncation="right")])
    short.max_seq_length = 5
    close(short.encode(TEXTS), embedder.encode(TEXTS, "hs", max_length=5, truncation="right"))
    with pytest.raises(InputError, match=r"^max_seq_length must be an integer in \[1, 512\]"):
        short.max_seq_length = 0


def test_bad_input_is_refused_with_its_reason(model, embedder, checkpoint, tmp_path):
    with pytest.raises(InputError, match=r"^MoEE embeds text only; the input at index 1 is int$"):
        model[0].preprocess(["a", 1])
    with pytest.raises(InputError, match=r"^MoEE takes no processing_kwargs"):
        model.encode(TEXTS, processing_kwargs={"text": {"max_length": 8}})
    with pytest.raises(InputError, match=r"^alpha='auto': sentence-transformers encodes in batches of its own"):
        MoEE(embedder, alpha="auto")
    with pytest.raises(InputError, match=r"^model must be a checkpoint \(a folder or a hub id\) or an MoEEmbedder, got int$"):
        MoEE(42)
    with pytest.raises(InputError, match=r"^dtype, int8 and device are how a checkpoint is loaded"):
        MoEE(embedder, dtype="bfloat16")
    with pytest.raises(UnknownOptionError, match=r"'pooling_mode' \(did you mean 'pooling'\?\)"):
        MoEE(embedder, pooling_mode="mean")
    with pytest.raises(InputError, match=r"^kind='moe' is not valid"):
        MoEE(embedder, "moe")
    streamed = MoEEmbedder.from_pretrained(checkpoint, dtype=torch.float32, memory_budget="64MB")
    with pytest.raises(InputError, match=r"^the layer-streamed mode \(memory_budget\) reads every layer once per call"):
        MoEE(streamed)
    model.save(str(tmp_path / "saved"))
    with pytest.raises(UnknownOptionError, match=r"^load\(\) got unknown option\(s\) 'dtypes'"):
        moee_st.load(tmp_path / "saved", model_kwargs={"dtypes": "float32"})
    with pytest.raises(CheckpointError, match=r"no modules.json; it is not a saved sentence-transformers model$"):
        moee_st.load(tmp_path)


def test_import_moee_ref_does_not_import_sentence_transformers():
    code = "import sys, moee_ref; moee_ref.MoEEmbedder; print('sentence_transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_langchain_huggingface_embeddings(model, tmp_path):
    langchain = pytest.importorskip("langchain_huggingface")
    model.save(str(tmp_path / "saved"))
    embeddings = langchain.HuggingFaceEmbeddings(model_name=str(tmp_path / "saved"), model_kwargs={"trust_remote_code": True})
    assert np.allclose(embeddings.embed_documents(TEXTS[:2]), model.encode(TEXTS[:2]), atol=1e-6)
    assert math.isclose(embeddings.embed_query(TEXTS[0])[0], float(model.encode(TEXTS[0])[0]), abs_tol=1e-6)
