"""MTEB through sentence-transformers: mteb's own wrapper of the s-t model scores as moee-ref's MoEEEncoder does,
on local in-memory tasks (no download)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sentence_transformers")
mteb = pytest.importorskip("mteb")

from datasets import Dataset, DatasetDict  # noqa: E402  (mteb depends on datasets)
from mteb.abstasks import AbsTaskClassification, AbsTaskSTS  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint  # noqa: E402
from moee_ref.embedding.embedder import MoEEmbedder  # noqa: E402
from moee_ref.evaluation.mteb import MoEEEncoder  # noqa: E402
from moee_ref.st import MoEE  # noqa: E402

SUBJECTS = ["The cat", "A young dog", "My neighbour", "The old teacher", "A small child", "The pilot"]
ACTIONS = ["sleeps on the sofa", "reads a long book", "runs in the park", "cooks dinner for friends", "sings a song"]
PAIRS = [(f"{s} {a}.", f"{s} {b}.") for s in SUBJECTS[:4] for a, b in zip(ACTIONS, ACTIONS[1:] + ACTIONS[:1])]
PAIRS[3] = (PAIRS[3][0], "")  # MTEB data holds a few empty texts
GOLD = [float((7 * i) % 11) / 2 for i in range(len(PAIRS))]
COMMON = dict(
    description="Local in-memory task for the moee-ref tests.", reference="https://example.org/moee-ref-tests",
    dataset={"path": "local/moee-ref-st-tests", "revision": "1"}, category="t2t", modalities=["text"], eval_splits=["test"],
    eval_langs=["eng-Latn"], date=("2024-01-01", "2024-01-02"), domains=["Written"], task_subtypes=[], license="mit",
    annotations_creators="derived", dialect=[], sample_creation="created", bibtex_citation="",
)


class LocalSTS(AbsTaskSTS):
    metadata = TaskMetadata(name="MoEERefStLocalSTS", type="STS", main_score="cosine_spearman", **COMMON)
    min_score = 0
    max_score = 5

    def load_data(self, num_proc=None, **kwargs):
        first, second = zip(*PAIRS)
        self.dataset = DatasetDict({"test": Dataset.from_dict({"sentence1": list(first), "sentence2": list(second), "score": GOLD})})
        self.data_loaded = True


class LocalClassification(AbsTaskClassification):
    metadata = TaskMetadata(name="MoEERefStLocalClassification", type="Classification", main_score="accuracy", **COMMON)
    n_experiments = 2

    def load_data(self, num_proc=None, **kwargs):
        def split(offset):
            texts = [f"{s} {a}." for s in SUBJECTS[offset::2] for a in ACTIONS]
            return Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(len(texts))]})

        self.dataset = DatasetDict({"train": split(0), "test": split(1)})
        self.data_loaded = True


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    torch.set_num_threads(1)
    path = write_random_checkpoint(tmp_path_factory.mktemp("st-mteb") / "olmoe", SMALL_CONFIGS["olmoe"], seed=41)
    return MoEEmbedder.from_pretrained(path, dtype=torch.float32, batch_size=8)


def score(model, task) -> float:
    (result,) = mteb.evaluate(model, task, cache=None, co2_tracker=False, show_progress_bar=False,
                              encode_kwargs={"batch_size": 8}).task_results
    return float(result.get_score())


@pytest.mark.parametrize("task", [LocalSTS, LocalClassification])
def test_mteb_through_sentence_transformers_scores_as_moee_encoder(embedder, task):
    settings = dict(prompt="prompteol", alpha=0.5)
    # MoEEEncoder's own defaults for MTEB data: empty texts embedded, over-long ones cut, moee-sum rows unit length.
    model = SentenceTransformer(modules=[MoEE(embedder, "moee-sum", allow_empty=True, truncation="right", normalize=True,
                                              **settings)])
    ours = score(MoEEEncoder(embedder, "moee-sum", **settings), task())
    theirs = score(model, task())
    assert theirs == pytest.approx(ours, abs=1e-6)
