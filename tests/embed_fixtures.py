"""Shared helpers and fixtures of test_embed.py and test_official.py.

Embedders are built on small random checkpoints (moee_ref.synthetic), one per
family and test module. The helpers compute HS and RW "by hand": the
tokenizer's ids and one direct call of the decoder, with no MoEEmbedder code.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from moee_ref.loading import checkpoint
from moee_ref.embedding.embedder import MoEEmbedder
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint

# Different lengths (in tokens), so that batches are padded.
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Rain is expected tomorrow.",
    "Hidden states from every layer can serve as sentence embeddings without fine-tuning, the paper says.",
    "Cats sleep.",
    "The museum displays paintings, sculptures and ancient manuscripts.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Good documentation explains what the code does.",
    "A",
]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One torch thread: on models this small, more threads only add contention (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tensor_reads(monkeypatch) -> Counter:
    """How many times each checkpoint tensor is read from the shards (through checkpoint._OpenShards.read)."""
    reads: Counter = Counter()
    real_read = checkpoint._OpenShards.read

    def read(self, name):
        reads[name] += 1
        return real_read(self, name)

    monkeypatch.setattr(checkpoint._OpenShards, "read", read)
    return reads


OLMOE_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "olmoe-tokenizer.json"


def build_real_vocab_olmoe(tmp_path_factory, seed: int) -> MoEEmbedder:
    """A small random OLMoE with the real vocabulary size and OLMoE's real tokenizer (skips without the file)."""
    if not OLMOE_TOKENIZER.is_file():
        pytest.skip(f"the real OLMoE tokenizer is not at {OLMOE_TOKENIZER}")
    directory = tmp_path_factory.mktemp("olmoe-real-vocab") / "model"
    write_random_checkpoint(directory, {**SMALL_CONFIGS["olmoe"], "vocab_size": 50304}, seed=seed, tokenizer=False)
    shutil.copyfile(OLMOE_TOKENIZER, directory / "tokenizer.json")
    config = {"pad_token": "<|padding|>", "eos_token": "<|endoftext|>", "add_bos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return MoEEmbedder.from_pretrained(directory, dtype=torch.float32)


def build_embedder(tmp_path_factory, family: str, seed: int = 0, **embedder_kwargs) -> MoEEmbedder:
    directory = tmp_path_factory.mktemp(f"ckpt-{family}") / "model"
    write_random_checkpoint(directory, SMALL_CONFIGS[family], seed=seed)
    return MoEEmbedder.from_pretrained(directory, **{"dtype": torch.float32, **embedder_kwargs})


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    return build_embedder(tmp_path_factory, "olmoe", seed=11)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_embedder(tmp_path_factory, "qwen2_moe", seed=12)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return build_embedder(tmp_path_factory, "deepseek", seed=13)


@pytest.fixture(scope="module")
def newer(tmp_path_factory):
    """The families after the paper's three, which the official mode does not cover."""
    return {family: build_embedder(tmp_path_factory, family, seed=14 + i) for i, family in enumerate(("qwen3_moe", "mixtral", "deepseek_v2", "gpt_oss"))}


@pytest.fixture(scope="module")
def embedders(olmoe, qwen, deepseek, newer):
    return {"olmoe": olmoe, "qwen2_moe": qwen, "deepseek": deepseek, **newer}


def run_alone(embedder: MoEEmbedder, ids: list[int], **model_kwargs):
    """The decoder's output for one unpadded sequence of ids."""
    with torch.inference_mode():
        return embedder.model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), **model_kwargs)


def hand_last_token(embedder: MoEEmbedder, text: str, rw_values: str = "probs") -> tuple[np.ndarray, np.ndarray]:
    """(HS [D], RW [L*E]) of one text: final state and router outputs of its last token, layers in order."""
    out = run_alone(embedder, embedder.tokenizer.encode(text))
    routing = out.router_probs if rw_values == "probs" else out.router_logits
    rw = torch.cat([routing[0, layer, -1] for layer in range(routing.shape[1])])
    return out.hidden_states[0, -1].numpy(), rw.numpy()


def max_rel_error(ours, ref) -> float:
    """max |ours - ref| / max |ref| over the whole array."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def sample_std_standardize(x, eps: float = 1e-8) -> np.ndarray:
    """(x - column mean) / (column sample std + eps), in float64."""
    x = np.asarray(x, np.float64)
    return (x - x.mean(0)) / (x.std(0, ddof=1) + eps)
