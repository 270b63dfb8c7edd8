"""The MTEB wrapper, run through mteb's real evaluation on local in-memory tasks (no download)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

mteb = pytest.importorskip("mteb")

from datasets import Dataset, DatasetDict  # noqa: E402  (mteb depends on datasets)
from mteb.abstasks import AbsTaskClassification, AbsTaskSTS  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from moee_ref.embedding import pipeline
from moee_ref.embedding.embedder import MoEEmbedder  # noqa: E402
from moee_ref.errors import InputError, MoEERefError  # noqa: E402
from moee_ref.evaluation.mteb import (  # noqa: E402
    MISSING_MTEB,
    PAPER_TASKS,
    MissingExtraError,
    MoEEEncoder,
    TaskDataError,
    checkpoint_identity,
    require_mteb,
    run_mteb,
    task_names_of,
)
from moee_ref.embedding.stats import spearman  # noqa: E402
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint  # noqa: E402

SUBJECTS = ["The cat", "A young dog", "My neighbour", "The old teacher", "A small child", "The pilot"]
ACTIONS = ["sleeps on the sofa", "reads a long book", "runs in the park", "cooks dinner for friends", "sings a song"]
PAIRS = [(f"{s} {a}.", f"{s} {b}.") for s in SUBJECTS for a, b in zip(ACTIONS, ACTIONS[1:] + ACTIONS[:1])]
PAIRS[3] = (PAIRS[3][0], "")  # MTEB data holds a few empty texts; they must not crash the run
GOLD = [float((7 * i) % 11) / 2 for i in range(len(PAIRS))]  # distinct-ish scores in [0, 5]

COMMON = dict(
    description="Local in-memory task for the moee-ref tests.",
    reference="https://example.org/moee-ref-tests",
    dataset={"path": "local/moee-ref-tests", "revision": "1"},
    category="t2t",
    modalities=["text"],
    eval_splits=["test"],
    eval_langs=["eng-Latn"],
    date=("2024-01-01", "2024-01-02"),
    domains=["Written"],
    task_subtypes=[],
    license="mit",
    annotations_creators="derived",
    dialect=[],
    sample_creation="created",
    bibtex_citation="",
)


class LocalSTS(AbsTaskSTS):
    metadata = TaskMetadata(name="MoEERefLocalSTS", type="STS", main_score="cosine_spearman", **COMMON)
    min_score = 0
    max_score = 5

    def load_data(self, num_proc=None, **kwargs):
        first, second = zip(*PAIRS)
        data = {"sentence1": list(first), "sentence2": list(second), "score": GOLD}
        self.dataset = DatasetDict({"test": Dataset.from_dict(data)})
        self.data_loaded = True


class LocalClassification(AbsTaskClassification):
    metadata = TaskMetadata(name="MoEERefLocalClassification", type="Classification", main_score="accuracy", **COMMON)
    n_experiments = 2

    def load_data(self, num_proc=None, **kwargs):
        def split(offset):
            texts = [f"{s} {a}." for s in SUBJECTS[offset::2] for a in ACTIONS]
            return Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(len(texts))]})

        self.dataset = DatasetDict({"train": split(0), "test": split(1)})
        self.data_loaded = True


class OfflineSTS(LocalSTS):
    metadata = TaskMetadata(name="MoEERefOfflineSTS", type="STS", main_score="cosine_spearman", **COMMON)

    def load_data(self, num_proc=None, **kwargs):
        raise ConnectionError("Couldn't reach 'local/moee-ref-tests' on the Hub (LocalEntryNotFoundError)")


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("mteb") / "olmoe", SMALL_CONFIGS["olmoe"])
    return MoEEmbedder.from_pretrained(path, dtype=torch.float32, batch_size=8)


def loader(texts, batch_size=4):
    """Batches as mteb builds them for a text task."""
    return DataLoader(Dataset.from_dict({"text": texts}), batch_size=batch_size)


def test_sts_score_is_the_spearman_of_the_encoder_vectors(embedder, tmp_path):
    options = dict(kind="moee-sum", prompt="prompteol", alpha=0.5)
    results = run_mteb(embedder, [LocalSTS()], batch_size=4, output_dir=tmp_path, **options)
    entry = results["MoEERefLocalSTS"]
    assert json.loads(json.dumps(results)) == results
    assert entry["main_score_name"] == "cosine_spearman" and math.isfinite(entry["main_score"])
    (scores,) = entry["scores"]["test"]

    first, second = (list(side) for side in zip(*PAIRS))
    encode = dict(kind=options["kind"], prompt=options["prompt"], alpha=options["alpha"], allow_empty=True)
    a, b = embedder.encode(first, **encode), embedder.encode(second, **encode)
    cosine = [float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b)]
    expected = spearman(cosine, GOLD)
    assert entry["main_score"] == pytest.approx(expected, abs=1e-6)
    assert scores["spearman"] == pytest.approx(expected, abs=1e-6)  # via the encoder's own similarity_pairwise
    assert list(tmp_path.rglob("MoEERefLocalSTS.json")), "mteb wrote no result file into output_dir"


def test_classification_runs(embedder):
    results = run_mteb(embedder, [LocalClassification()], kind="hs", prompt=None, alpha=1.0)
    score = results["MoEERefLocalClassification"]["main_score"]
    assert math.isfinite(score) and 0.0 <= score <= 1.0


@pytest.mark.parametrize(
    "task",
    [
        mteb.mocks.MockClusteringTask,
        mteb.mocks.LegacyMockClusteringFastTask,
        mteb.mocks.MockPairClassificationTask,
        mteb.mocks.MockRerankingTask,
        mteb.mocks.MockRetrievalTask,
        mteb.mocks.MockSummarizationTask,
    ],
    ids=lambda cls: cls.metadata.type,
)
def test_the_other_task_types_of_the_paper_run(embedder, task):
    (entry,) = run_mteb(embedder, [task()], kind="moee-sum", prompt="prompteol", alpha=1.0).values()
    assert math.isfinite(entry["main_score"])


def test_kinds_and_prompts_pass_through(embedder):
    texts = [f"{s} {a}." for s in SUBJECTS[:2] for a in ACTIONS] + [" "]

    def vectors(kind, prompt, **options):
        encoder = MoEEEncoder(embedder, kind, prompt=prompt, alpha=2.0, **options)
        got = encoder.encode(loader(texts), task_metadata=None, hf_split="test", hf_subset="default")
        want = embedder.encode(texts, kind, prompt=prompt, alpha=2.0, allow_empty=True, **options)
        np.testing.assert_array_equal(got, want)  # every batch's texts, in order
        assert got.shape[1] == encoder.mteb_model_meta.embed_dim
        return got

    hs, rw = vectors("hs", None), vectors("rw", None)
    assert hs.shape[1] == embedder.args.hidden_size and rw.shape[1] == embedder.args.routing_dim
    assert not np.allclose(vectors("hs", "prompteol"), hs)
    assert not np.allclose(vectors("hs", None, pooling="mean"), hs)
    assert vectors("moee-concat", None).shape[1] == hs.shape[1] + rw.shape[1]


def test_empty_texts_do_not_crash(embedder):
    texts = ["A cat sleeps.", "", "A dog runs."]
    for prompt in (None, "prompteol"):
        encoder = MoEEEncoder(embedder, "moee-sum", prompt=prompt)
        got = encoder.encode(loader(texts, batch_size=2), task_metadata=None, hf_split="test", hf_subset="default")
        if prompt is None:  # the olmoe-style tokenizer adds no BOS: an empty text has no token, hence a zero vector
            assert not embedder.tokenizer.adds_bos and not got[1].any()
            np.testing.assert_array_equal(got[[0, 2]], embedder.encode(texts[::2], "moee-sum", normalize=True))
        else:  # with a prompt there are tokens to embed (moee-sum rows reach mteb at unit length)
            np.testing.assert_array_equal(got, embedder.encode(texts, "moee-sum", prompt=prompt, allow_empty=True, normalize=True))
    results = run_mteb(embedder, [LocalSTS()], kind="rw", prompt=None)  # PAIRS holds an empty text
    assert math.isfinite(results["MoEERefLocalSTS"]["main_score"])


def test_standardizer_and_progress_setting_reach_encode(embedder, capsys):
    from moee_ref.embedding.standardize import Standardizer

    texts = [f"{s} {a}." for s in SUBJECTS for a in ACTIONS] * 9  # 270 texts: over the automatic progress threshold
    fitted = embedder.fit_standardizer(texts[:30], "rw")
    encoder = MoEEEncoder(embedder, "moee-concat", standardizer=fitted, show_progress_bar=False)
    got = encoder.encode(loader(texts), task_metadata=None, hf_split="test", hf_subset="default", show_progress_bar=True)
    assert "embedding" not in capsys.readouterr().err  # the encoder's show_progress_bar=False wins over mteb's True
    want = embedder.encode(texts, "moee-concat", standardizer=fitted, allow_empty=True, show_progress_bar=False)
    np.testing.assert_array_equal(got, want)
    assert isinstance(fitted, Standardizer)
    plain = MoEEEncoder(embedder, "moee-concat").encode(loader(texts[:4]), task_metadata=None, hf_split="test", hf_subset="default")
    assert not np.allclose(plain, got[:4])


def test_model_meta(embedder):
    encoder = MoEEEncoder(embedder, "moee-sum", prompt="PromptEOL", alpha=0.25, rw_layers=[1, 2])
    meta = encoder.mteb_model_meta
    assert isinstance(meta, mteb.models.model_meta.ModelMeta) and isinstance(encoder, mteb.models.EncoderProtocol)
    assert meta.name == "moee-ref/olmoe-moee-sum" and re.fullmatch(r"sha256-[0-9a-f]{16}", meta.revision)
    assert meta.similarity_fn_name.value == "cosine" and meta.use_instructions
    assert meta.embed_dim == embedder.args.hidden_size + 2 * embedder.args.num_experts
    assert meta.n_parameters == embedder.args.parameter_counts()[0]
    assert meta.experiment_kwargs == {"prompt": "prompteol", "alpha": 0.25, "dtype": "float32", "rw_layers": [1, 2]}
    plain = MoEEEncoder(embedder, "hs").mteb_model_meta
    assert plain.experiment_kwargs == {"prompt": "none", "dtype": "float32"} and not plain.use_instructions


def test_moee_sum_cosine_is_the_weighted_sum(embedder):
    texts = [f"{s} {a}." for s in SUBJECTS[:3] for a in ACTIONS[:2]]
    alpha = 0.7
    hs, rw = embedder.encode(texts, "hs"), embedder.encode(texts, "rw")
    encoder = MoEEEncoder(embedder, "moee-sum", alpha=alpha)
    vectors = encoder.encode(loader(texts), task_metadata=None, hf_split="test", hf_subset="default")
    sim = encoder.similarity(vectors, torch.as_tensor(vectors)).numpy()
    weighted = (embedder.similarity(hs, hs) + alpha * embedder.similarity(rw, rw)) / (1 + alpha)
    np.testing.assert_allclose(sim, weighted, atol=1e-5)
    pairwise = encoder.similarity_pairwise(vectors[:-1], vectors[1:]).numpy()
    np.testing.assert_allclose(pairwise, np.diag(weighted, 1), atol=1e-5)
    assert float(encoder.similarity(vectors[0], vectors[1])) == pytest.approx(weighted[0, 1], abs=1e-5)  # 1-D inputs
    assert float(encoder.similarity(np.zeros(vectors.shape[1]), vectors[0])) == 0.0


def test_bad_options_are_input_errors(embedder):
    for kwargs in (dict(kind="nope"), dict(alpha="auto"), dict(alpha=-1.0), dict(prompt="no-such-prompt"), dict(poolling="mean")):
        with pytest.raises(InputError):
            MoEEEncoder(embedder, **kwargs)
    with pytest.raises(InputError, match="unknown MTEB task 'NoSuchTaskAnywhere'"):
        run_mteb(embedder, ["NoSuchTaskAnywhere"])
    with pytest.raises(InputError, match="'STS12' has no subset in languages"):
        run_mteb(embedder, ["STS12"], languages=["deu"])


def test_unavailable_data_is_a_clear_error(embedder):
    with pytest.raises(TaskDataError, match=r"^MTEB task .MoEERefOfflineSTS.: its data \(local/moee-ref-tests on the Hugging Face hub\) cannot be loaded: .*HF cache") as info:
        run_mteb(embedder, [OfflineSTS()])
    assert isinstance(info.value, MoEERefError) and isinstance(info.value.__cause__, ConnectionError)


def test_missing_mteb_is_reported(embedder, monkeypatch):
    monkeypatch.setitem(sys.modules, "mteb", None)  # what `import mteb` meets when it is not installed
    with pytest.raises(MissingExtraError, match=re.escape(MISSING_MTEB)):
        require_mteb()
    with pytest.raises(MissingExtraError, match=re.escape(MISSING_MTEB)):
        run_mteb(embedder, ["STS12"])
    assert issubclass(MissingExtraError, MoEERefError)


def test_importing_the_wrapper_does_not_import_mteb():
    code = "import sys, moee_ref.evaluation.mteb; assert 'mteb' not in sys.modules, 'mteb was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- tasks by name, offline data, cache identity ------------------------------------------------


def test_tasks_resolve_by_name_with_and_without_languages():
    from moee_ref.evaluation.mteb import _tasks

    (sts12,) = _tasks(mteb, ["STS12"], None)
    assert sts12.metadata.name == "STS12" and sts12.hf_subsets == ["default"]
    (sts17,) = _tasks(mteb, ["STS17"], ["eng"])
    assert sts17.hf_subsets == ["en-en"]  # only the subset wholly in English


def test_the_papers_task_set_and_task_types():
    names = task_names_of(["paper"])
    assert len(names) == 19 and names == [n for group in PAPER_TASKS.values() for n in group]
    assert task_names_of(["paper"], ["STS", "Summarization"]) == PAPER_TASKS["STS"] + ["SummEval"]
    assert task_names_of(["STS12", "paper"], ["Clustering"]) == PAPER_TASKS["Clustering"]
    with pytest.raises(InputError, match=r"^unknown MTEB task type\(s\) 'Sts'; the paper's are Classification, "):
        task_names_of(["paper"], ["Sts"])


def test_a_named_task_without_data_fails_at_once_when_the_hub_cannot_be_reached(embedder, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(TaskDataError) as info:
        run_mteb(embedder, ["STS12"])
    assert str(info.value) == (
        "MTEB task 'STS12': its data (mteb/sts12-sts on the Hugging Face hub) cannot be loaded: the hub "
        "(http://127.0.0.1:9) cannot be reached and the local cache does not hold it. Download it where there is "
        "network (it lands in the HF cache: HF_HOME / HF_DATASETS_CACHE) and copy that cache here; with "
        "HF_HUB_OFFLINE=1 set, the cache alone is used"
    )
    assert constants.HF_HUB_OFFLINE is False  # offline only for that load


def test_mtebs_cache_keeps_each_checkpoint_and_int8_apart(embedder, tmp_path):
    """Two checkpoints in folders of the same name, and the first as int8: with mteb's default cache policy
    (only-missing) each must get its own score, not the first one's."""
    other = write_random_checkpoint(tmp_path / "elsewhere" / "olmoe", SMALL_CONFIGS["olmoe"], seed=99)
    models = {
        "first": embedder,
        "other": MoEEmbedder.from_pretrained(other, dtype=torch.float32, batch_size=8),
        "int8": MoEEmbedder.from_pretrained(embedder.model.source_dir, dtype=torch.bfloat16, int8=True, batch_size=8),
    }

    def score(model, cache):
        encoder = MoEEEncoder(model, "moee-sum", prompt="prompteol", alpha=1.0)
        outcome = mteb.evaluate(encoder, LocalSTS(), cache=cache, co2_tracker=False, show_progress_bar=False)
        return outcome.task_results[0].get_score()

    own = {name: score(model, None) for name, model in models.items()}
    assert len(set(own.values())) == 3
    shared = mteb.ResultCache(tmp_path / "cache")
    assert {name: score(model, shared) for name, model in models.items()} == own


def test_checkpoint_identity_of_a_hub_snapshot_and_of_local_folders(embedder, tmp_path):
    snapshot = tmp_path / "hub" / "models--allenai--OLMoE-1B-7B-0924" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert checkpoint_identity(snapshot) == ("allenai__OLMoE-1B-7B-0924", "0123abcd")
    source = embedder.model.source_dir
    copy = tmp_path / "copy" / source.name
    shutil.copytree(source, copy)
    assert checkpoint_identity(copy) == checkpoint_identity(source)  # the same weights, wherever they are
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert checkpoint_identity(copy)[1] != checkpoint_identity(source)[1]


def test_a_precision_the_encoder_does_not_compute_is_refused(embedder):
    encoder = MoEEEncoder(embedder, "hs")
    with pytest.raises(InputError, match=r"^precision='int8': the MoEE encoder returns float32 vectors only"):
        encoder.encode(loader(["a text"]), precision="int8")
    assert encoder.encode(loader(["a text"]), precision="float32").shape == (1, embedder.args.hidden_size)


def test_no_progress_bar_unless_asked(embedder, capfd):
    run_mteb(embedder, [mteb.mocks.MockClusteringTask()], kind="hs", show_progress_bar=False)
    run_mteb(embedder, [LocalSTS()], kind="hs")
    err = capfd.readouterr().err
    assert "%|" not in err and "it/s" not in err, err[-500:]


def test_cli_runs_a_named_task_to_the_data_message_at_once(embedder):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "moee_ref.cli.main", "eval", "mteb", "--model", str(embedder.model.source_dir),
         "--tasks", "paper", "--task-types", "STS", "--dtype", "float32", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(
        "moee eval mteb: error: MTEB task 'STS12': its data (mteb/sts12-sts on the Hugging Face hub) cannot be loaded: "
        "the hub (http://127.0.0.1:9) cannot be reached and the local cache does not hold it.")


def test_query_and_document_prompts_reach_their_texts(embedder):
    """mteb marks retrieval queries and documents with a prompt_type; each gets its own prompt, other texts `prompt`."""
    from mteb.types import PromptType

    texts = [f"{s} {a}." for s in SUBJECTS[:2] for a in ACTIONS]
    encoder = MoEEEncoder(embedder, "hs", prompt="none", prompts={"query": "query: ", "document": "prompteol"})

    def got(prompt_type):
        return encoder.encode(loader(texts), task_metadata=None, hf_split="test", hf_subset="default", prompt_type=prompt_type)

    np.testing.assert_array_equal(got(PromptType.query), embedder.encode(texts, "hs", prompt="query: {text}"))
    np.testing.assert_array_equal(got(PromptType.document), embedder.encode(texts, "hs", prompt="prompteol"))
    np.testing.assert_array_equal(got(None), embedder.encode(texts, "hs"))
    plain = MoEEEncoder(embedder, "hs", prompt="none")
    kwargs, plain_kwargs = encoder._experiment_kwargs(), plain._experiment_kwargs()
    assert kwargs["query_prompt"].startswith("custom-") and kwargs["document_prompt"] == "prompteol"
    assert "query_prompt" not in plain_kwargs  # results of the two are filed apart
    with pytest.raises(InputError, match=r"^prompts takes the keys query, document \(mteb's prompt types\), got passage$"):
        MoEEEncoder(embedder, "hs", prompts={"passage": "passage: "})
    with pytest.raises(InputError, match=r"^prompts\['query'\] is 'promptEOLL': not a built-in prompt name \(did you mean 'prompteol'\?\)"):
        MoEEEncoder(embedder, "hs", prompts={"query": "promptEOLL"})


def test_cli_query_and_document_prompts_reach_run_mteb(embedder, monkeypatch, capsys):
    from moee_ref.cli import main as cli
    from moee_ref.evaluation import mteb as mteb_wrapper

    seen = {}

    def fake_run(embedder_, tasks, **kwargs):
        seen.update(kwargs)
        return {"STS12": {"main_score": 0.5}}

    monkeypatch.setattr(mteb_wrapper, "run_mteb", fake_run)
    monkeypatch.setattr(cli, "load_embedder", lambda ns: embedder)
    code = cli.main(["eval", "mteb", "--model", str(embedder.model.source_dir), "--tasks", "STS12",
                     "--query-prompt", "query: ", "--document-prompt", "prompteol"])
    assert code == 0 and seen["prompts"] == {"query": "query: ", "document": "prompteol"}
    assert "STS12" in capsys.readouterr().out
    cli.main(["eval", "mteb", "--model", str(embedder.model.source_dir), "--tasks", "STS12"])
    assert seen["prompts"] == {}


def test_retrieval_through_mteb_gives_queries_and_documents_their_prompts(embedder, monkeypatch):
    """A retrieval task run through mteb: its queries get prompts["query"], its corpus prompts["document"]."""
    seen = []
    real = pipeline.run

    def spy(embedder, texts, spec, **options):  # every front end embeds through the pipeline
        seen.append(spec.prompt)
        return real(embedder, texts, spec, **options)

    monkeypatch.setattr(pipeline, "run", spy)
    (entry,) = run_mteb(embedder, [mteb.mocks.MockRetrievalTask()], kind="hs", prompt="none",
                        prompts={"query": "query: ", "document": "passage: "}).values()
    assert math.isfinite(entry["main_score"])
    assert set(seen) == {"query: {text}", "passage: {text}"}


def test_over_long_documents_are_cut_to_the_models_length_and_counted(embedder):
    long_text = " ".join(["the river runs past the old mill"] * 120)  # far beyond 512 positions
    texts = [long_text, "A cat sleeps."]
    with pytest.raises(InputError, match="max_position_embeddings|max_length"):
        embedder.encode(texts, "hs")  # encode() itself refuses them unless asked to cut
    encoder = MoEEEncoder(embedder, "hs", prompt="prompteol")
    got = encoder.encode(loader(texts), task_metadata=None, hf_split="test", hf_subset="default")
    want = embedder.encode(texts, "hs", prompt="prompteol", max_length=embedder.max_seq_length, truncation="right")
    np.testing.assert_array_equal(got, want)
    assert encoder.num_truncated == 1
    assert "max_length" not in encoder._experiment_kwargs()  # the default: not a setting of its own
    assert MoEEEncoder(embedder, "hs", max_length=64)._experiment_kwargs()["max_length"] == 64


def test_moee_sum_rows_are_unit_length_for_mteb(embedder):
    """For classification alpha should only balance HS and RW: moee-sum rows reach mteb at unit length."""
    texts = [f"{s} {a}." for s in SUBJECTS[:2] for a in ACTIONS[:3]]
    alpha = 3.0

    def norms(kind, **options):
        vectors = MoEEEncoder(embedder, kind, alpha=alpha, **options).encode(loader(texts), task_metadata=None, hf_split="test", hf_subset="default")
        return np.linalg.norm(vectors, axis=1)

    np.testing.assert_allclose(norms("moee-sum"), 1.0, atol=1e-6)
    np.testing.assert_allclose(norms("moee-sum", normalize=False), math.sqrt(1 + alpha), atol=1e-5)
    assert not np.allclose(norms("hs"), 1.0)  # other kinds as encode() gives them
    assert "normalize" not in MoEEEncoder(embedder, "moee-sum")._experiment_kwargs()
    assert MoEEEncoder(embedder, "moee-sum", normalize=False)._experiment_kwargs()["normalize"] is False


# --- the authors' pipeline (mode="official") through mteb --------------------------------------------


def test_official_sts_through_mteb_is_the_authors_ensemble(embedder):
    from moee_ref.io.inputs import Pairs
    from moee_ref.evaluation.sts import evaluate_sts_official
    from moee_ref.embedding.official import encode_official

    options = dict(kind="moee-sum", prompt="prompteol", alpha=0.5, instruction="Retrieve semantically similar text.")
    (entry,) = run_mteb(embedder, [LocalSTS()], batch_size=4, mode="official", **options).values()
    assert (entry["mode"], entry["batch_size"], entry["ensemble"]) == ("official", 4, "standardized")
    first, second = (list(side) for side in zip(*PAIRS))
    a, b = (encode_official(embedder, side, batch_size=4, **options) for side in (first, second))
    cosine = [float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b)]
    assert entry["main_score"] == pytest.approx(spearman(cosine, GOLD), abs=1e-6)
    # 30 pairs in batches of 4 leave no batch of one, so mteb's cosine ranks as their ensemble does
    table = evaluate_sts_official(embedder, Pairs(first, second, GOLD), batch_size=4, **{k: v for k, v in options.items() if k != "kind"})
    (summed,) = [row for row in table["rows"] if row["embedding"] == "moee-sum"]
    assert entry["main_score"] == pytest.approx(summed["spearman"], abs=1e-6)
    default = run_mteb(embedder, [LocalSTS()], batch_size=4, kind="moee-sum", prompt="prompteol", alpha=0.5)
    assert default["MoEERefLocalSTS"]["main_score"] != pytest.approx(entry["main_score"], abs=1e-6)


def test_official_similarity_is_their_score_for_each_kind(embedder):
    summed = MoEEEncoder(embedder, "moee-sum", mode="official", alpha=2.0)
    hidden = embedder.args.hidden_size
    a = np.hstack([np.ones((2, hidden)) / math.sqrt(hidden), np.zeros((2, 4))]).astype(np.float32)  # RW part zero
    b = np.hstack([np.ones((2, hidden)) / math.sqrt(hidden), math.sqrt(2.0) * np.eye(2, 4)]).astype(np.float32)
    # cos(HS) + alpha cos(RW), a zero part scoring 0 as their torch cos_sim gives it (cosine of the vectors: 1/sqrt(3))
    np.testing.assert_allclose(summed.similarity_pairwise(a, b).numpy(), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(summed.similarity(a, b).numpy(), np.ones((2, 2)), rtol=1e-6)
    hs = MoEEEncoder(embedder, "hs", mode="official")
    np.testing.assert_allclose(hs.similarity_pairwise(a, 3 * a).numpy(), [1.0, 1.0], rtol=1e-6)


def test_official_retrieval_gives_queries_and_documents_their_e5_instructions(embedder, monkeypatch):
    from moee_ref.embedding import official
    from moee_ref.embedding.official_tasks import e5_instruction

    class SciFactShaped(mteb.mocks.MockRetrievalTask):
        metadata = mteb.mocks.MockRetrievalTask.metadata.model_copy(update={"name": "SciFact"})

    seen = []
    real = official.encode_official

    def spy(embedder_, texts, kind="moee-sum", **options):
        seen.append(options["instruction"])
        return real(embedder_, texts, kind, **options)

    monkeypatch.setattr(official, "encode_official", spy)
    (entry,) = run_mteb(embedder, [SciFactShaped()], kind="moee-sum", mode="official", instruction="e5").values()
    assert math.isfinite(entry["main_score"]) and entry["instruction"] == "e5"
    assert set(seen) == {e5_instruction("SciFact", "query"), ""}


def test_official_mode_refusals(embedder):
    with pytest.raises(InputError, match=r"^mode='official' cannot reproduce moee-sum on MoEERefLocalClassification: "
                                         r"for classification and clustering the authors' code averages the label ids"):
        run_mteb(embedder, [LocalClassification(), LocalSTS()], kind="moee-sum", mode="official")
    score = run_mteb(embedder, [LocalClassification()], kind="hs", mode="official")["MoEERefLocalClassification"]["main_score"]
    assert 0.0 <= score <= 1.0
    with pytest.raises(InputError, match="^the authors' evaluation has no E5 instruction for MTEB task 'MoEERefLocalSTS'"):
        run_mteb(embedder, [LocalSTS()], kind="hs", mode="official", instruction="e5")
    with pytest.raises(InputError, match="^mode='official' reproduces the authors' pipeline and takes no prompts, max_length$"):
        MoEEEncoder(embedder, "hs", mode="official", prompts={"query": "q: "}, max_length=8)
    with pytest.raises(InputError, match="^mode='official' takes one of the authors' prompt names"):
        MoEEEncoder(embedder, "hs", mode="official", prompt="Say {text}")
    with pytest.raises(InputError, match="^instruction and ensemble are options of mode='official'$"):
        MoEEEncoder(embedder, "hs", instruction="x")
    with pytest.raises(InputError, match="^mode='fast' is not valid; choose default or official$"):
        MoEEEncoder(embedder, "hs", mode="fast")


def test_official_runs_are_filed_apart_from_default_ones(embedder):
    default = MoEEEncoder(embedder, "moee-sum").mteb_model_meta.experiment_kwargs
    official = MoEEEncoder(embedder, "moee-sum", mode="official").mteb_model_meta.experiment_kwargs
    assert "mode" not in default
    assert {k: official[k] for k in ("mode", "prompt", "instruction", "batch_size", "ensemble")} == {
        "mode": "official", "prompt": "none", "instruction": "none", "batch_size": 64, "ensemble": "standardized"}
    other = MoEEEncoder(embedder, "moee-sum", mode="official", instruction="e5", ensemble="unstandardized", batch_size=128)
    kwargs = other.mteb_model_meta.experiment_kwargs
    assert (kwargs["instruction"], kwargs["ensemble"], kwargs["batch_size"]) == ("e5", "unstandardized", 128)
    custom = MoEEEncoder(embedder, "hs", mode="official", instruction="Find it").mteb_model_meta.experiment_kwargs
    assert custom["instruction"].startswith("custom-") and "ensemble" not in custom


def test_cli_official_mode_reaches_run_mteb(embedder, monkeypatch, capsys):
    from moee_ref.cli import main as cli
    from moee_ref.evaluation import mteb as mteb_wrapper

    seen = {}
    monkeypatch.setattr(mteb_wrapper, "run_mteb", lambda embedder_, tasks, **kwargs: seen.update(kwargs) or {"STS12": {"main_score": 0.5}})
    monkeypatch.setattr(cli, "load_embedder", lambda ns: embedder)
    base = ["eval", "mteb", "--model", str(embedder.model.source_dir), "--tasks", "STS12"]
    assert cli.main([*base, "--mode", "official", "--instruction", "e5"]) == 0
    assert (seen["mode"], seen["instruction"], seen["ensemble"], seen["batch_size"]) == ("official", "e5", "standardized", 64)
    assert "prompts" not in seen and "standardizer" not in seen
    assert cli.main([*base, "--mode", "official", "--query-prompt", "q: "]) == 2
    assert "--mode official reproduces the authors' code and takes no --query-prompt" in capsys.readouterr().err
    assert cli.main([*base, "--instruction", "e5"]) == 2
    assert "--instruction is an option of --mode official" in capsys.readouterr().err
