"""Layer-streamed corpus mode (loading/streamed.py) on small random checkpoints of each family.

Ground truth is the resident model (MoEEmbedder.from_pretrained without a
memory budget). Tolerance: streamed features agree with the resident ones
within a max relative error (max |a - b| / max |b|) of 1e-5, the bound
issue 5 states; spilling to disk, read-ahead and the stored dtype must not
change a result. Memory budgets are set from StreamedModel.memory_plan for
the very batches a corpus makes, so that "smallest" really forces spilling.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import subprocess
import threading
import weakref
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from embed_fixtures import max_rel_error, single_thread, tensor_reads  # noqa: F401  (fixtures used by name)
import moee_ref.families
from moee_ref.embedding.official import encode_official
from moee_ref.embedding.embedder import FeatureOptions, MoEEmbedder, shared_prefix_ids
from moee_ref.errors import InputError, MoEERefError
from moee_ref.decoder.model import Block
from moee_ref.embedding.prompts import apply_prompt, resolve_prompt
from moee_ref.loading.streamed import ActivationStore, SpillError, StreamedModel, parse_bytes
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint
from moee_ref.loading.tokenizer import Tokenizer

FAMILIES = tuple(moee_ref.families.FAMILIES)  # every supported family
TOLERANCE = 1e-5  # max relative error, streamed vs resident
BATCH_SIZE = 3
LARGE_BUDGET = "8GB"

# 20 texts of different lengths: 7 batches of 3 (the last one of 2), each padded.
CORPUS = [
    "Cats sleep.",
    "The quick brown fox jumps over the lazy dog.",
    "Rain is expected tomorrow afternoon in the northern valleys.",
    "A",
    "Hidden states from every layer can serve as sentence embeddings without fine-tuning, the paper says.",
    "Good documentation explains what the code does and why it does it.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The museum displays paintings, sculptures and ancient manuscripts from three continents.",
    "Experts specialise.",
    "Routing weights are a second view of the same text.",
    "She sold the old bicycle and bought a train ticket to the coast.",
    "Numbers: 3, 14, 159, 2653.",
    "Short one.",
    "The committee postponed its decision until the report on costs, risks and schedules had been reviewed twice.",
    "Bread rises because yeast produces gas.",
    "Mixture-of-experts models send every token to a few of many feed-forward networks.",
    "Yes.",
    "He whistled while he worked on the roof all morning.",
    "A long sentence with many small words in it is still just one sentence in the end, is it not?",
    "Light travels fast.",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One float32 checkpoint per family, and a DeepSeek one stored in bfloat16."""
    root = tmp_path_factory.mktemp("stream-ckpt")
    dirs = {
        family: write_random_checkpoint(root / family, SMALL_CONFIGS[family], seed=20 + i)
        for i, family in enumerate(FAMILIES)
    }
    dirs["bf16"] = write_random_checkpoint(root / "bf16", SMALL_CONFIGS["deepseek"], dtype="bfloat16", seed=29)
    return dirs


@pytest.fixture(scope="module")
def resident(checkpoints):
    return {family: MoEEmbedder.from_pretrained(checkpoints[family], dtype=torch.float32) for family in FAMILIES}


def batch_shapes(tokenizer: Tokenizer, texts, batch_size: int) -> list[tuple[int, int]]:
    """[batch, length] of the padded batches a corpus makes: texts sorted longest first, then cut in order."""
    lengths = sorted((len(ids) for ids in tokenizer.tokenize(list(texts))[0]), reverse=True)
    chunks = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    return [(len(chunk), chunk[0]) for chunk in chunks]


def smallest_budget(directory, texts=CORPUS, batch_size=BATCH_SIZE, **model_kwargs) -> int:
    probe = StreamedModel(directory, memory_budget=LARGE_BUDGET, **model_kwargs)
    return probe.memory_plan(batch_shapes(Tokenizer.from_dir(directory), texts, batch_size))["smallest"]


def streamed(directory, budget, spill_dir, dtype=torch.float32, **model_kwargs) -> MoEEmbedder:
    model = StreamedModel(directory, dtype, memory_budget=budget, spill_dir=str(spill_dir), **model_kwargs)
    return MoEEmbedder(model, Tokenizer.from_dir(directory))


def stored_tensor_bytes(directory: Path) -> dict[str, int]:
    """Bytes of every tensor as stored, read from the safetensors headers (8-byte length, then JSON)."""
    sizes = {}
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                sizes[name] = end - start
    return sizes


@pytest.fixture
def spy_runs(monkeypatch):
    """The batch shapes every StreamedModel.run call received."""
    calls = []
    real_run = StreamedModel.run

    def run(self, batches, *args, **kwargs):
        calls.append([tuple(ids.shape) for ids, _, _ in batches])
        return real_run(self, batches, *args, **kwargs)

    monkeypatch.setattr(StreamedModel, "run", run)
    return calls


# ---------------------------------------------------------------------------
# Results equal the resident mode's


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", ["smallest", "large"])
def test_streamed_equals_resident(checkpoints, resident, family, budget, tmp_path, spy_runs):
    directory = checkpoints[family]
    shapes = batch_shapes(resident[family].tokenizer, CORPUS, BATCH_SIZE)
    assert len(shapes) == 7 and len({length for _, length in shapes}) > 1
    smallest = smallest_budget(directory)
    embedder = MoEEmbedder.from_pretrained(
        directory, dtype=torch.float32, memory_budget=smallest if budget == "smallest" else LARGE_BUDGET, spill_dir=str(tmp_path)
    )
    assert embedder.streamed
    for kind in ("hs", "rw", "moee-sum"):
        for pooling in ("last", "mean"):
            ours = embedder.encode(CORPUS, kind, batch_size=BATCH_SIZE, pooling=pooling)
            ref = resident[family].encode(CORPUS, kind, batch_size=BATCH_SIZE, pooling=pooling)
            assert ours.shape == ref.shape == (len(CORPUS), resident[family].dimension(kind))
            assert max_rel_error(ours, ref) <= TOLERANCE, (kind, pooling)
            assert embedder.model.stats.spilled is (budget == "smallest")
            assert os.listdir(tmp_path) == []  # the spill file is gone after every run
    # The plan was made for exactly the batches the embedder streamed.
    assert spy_runs and all(call == shapes for call in spy_runs)


def test_spilled_store_lives_in_spill_dir(checkpoints, tmp_path, monkeypatch):
    """With the smallest budget the activations really go through a file in spill_dir, sized for all batches."""
    seen = []
    real_put = ActivationStore.put

    def put(self, index, tensor):
        seen.append((self.spilled, getattr(self, "path", None), self.memmap.size if self.spilled else 0, self.total))
        assert f"{self.path} (deleted)" in Path("/proc/self/maps").read_text()  # mapped, its name already gone
        assert os.listdir(tmp_path) == []
        return real_put(self, index, tensor)

    monkeypatch.setattr(ActivationStore, "put", put)
    directory = checkpoints["olmoe"]
    embedder = streamed(directory, smallest_budget(directory), tmp_path)
    embedder.encode(CORPUS, "hs", batch_size=BATCH_SIZE)
    d = SMALL_CONFIGS["olmoe"]["hidden_size"]
    total = sum(b * t * d * 4 for b, t in batch_shapes(embedder.tokenizer, CORPUS, BATCH_SIZE))
    assert embedder.model.stats.activation_bytes == total
    assert seen and all(spilled for spilled, _, _, _ in seen)
    assert {Path(path).parent.parent for _, path, _, _ in seen} == {tmp_path}
    assert all(size == total == store_total for _, _, size, store_total in seen)
    assert os.listdir(tmp_path) == []


def test_bf16_checkpoint_streamed_equals_resident(checkpoints, tmp_path):
    directory = checkpoints["bf16"]
    for dtype in (torch.float32, torch.bfloat16):
        ref = MoEEmbedder.from_pretrained(directory, dtype)
        ours = streamed(directory, smallest_budget(directory, dtype=dtype), tmp_path, dtype)
        for kind in ("hs", "rw"):
            got = ours.encode(CORPUS, kind, batch_size=BATCH_SIZE)
            assert ours.model.stats.spilled is True
            assert max_rel_error(got, ref.encode(CORPUS, kind, batch_size=BATCH_SIZE)) <= TOLERANCE, (dtype, kind)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# Each weight is read once per corpus


def test_each_weight_read_once_per_corpus(checkpoints, tmp_path, tensor_reads):
    directory = checkpoints["deepseek"]
    stored = stored_tensor_bytes(directory)
    assert stored["lm_head.weight"] > 0  # untied head: skipping it is visible
    expected = sum(size for name, size in stored.items() if name != "lm_head.weight")

    reads = tensor_reads
    embedder = streamed(directory, smallest_budget(directory, batch_size=len(CORPUS)), tmp_path)  # fits every run below
    for batch_size, num_batches in ((len(CORPUS), 1), (BATCH_SIZE, 7), (1, len(CORPUS))):
        reads.clear()
        embedder.encode(CORPUS, "hs", batch_size=batch_size)
        assert len(batch_shapes(embedder.tokenizer, CORPUS, batch_size)) == num_batches
        assert embedder.model.stats.weight_bytes_read == expected, batch_size
        assert reads == Counter({name: 1 for name in stored if name != "lm_head.weight"}), batch_size


# ---------------------------------------------------------------------------
# Read-ahead


def record_layers(monkeypatch, num_layers: int, wait_for_next: bool):
    """Events (what, layer, thread, blocks alive) of build_layer calls and Block forwards, in order.

    With wait_for_next, the first forward of layer l waits (up to 2 s) until the build of
    layer l + 1 has started: with read-ahead it has been requested before, so the wait
    returns at once; without it, it times out and the order shows it.
    """
    events = []
    started = defaultdict(threading.Event)
    timed_out = set()
    alive = weakref.WeakSet()
    real_build, real_forward = StreamedModel.build_layer, Block.forward

    def build_layer(self, layer):
        events.append(("build", layer, threading.get_ident(), len(alive)))
        started[layer].set()
        block = real_build(self, layer)
        block.test_layer = layer
        alive.add(block)
        return block

    def forward(self, *args, **kwargs):
        layer = self.test_layer
        if wait_for_next and layer + 1 < num_layers and layer not in timed_out:
            if not started[layer + 1].wait(timeout=2.0):
                timed_out.add(layer)
        events.append(("forward", layer, threading.get_ident(), len(alive)))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(StreamedModel, "build_layer", build_layer)
    monkeypatch.setattr(Block, "forward", forward)
    return events


def test_read_ahead_builds_next_layer_during_compute(checkpoints, tmp_path, monkeypatch):
    directory = checkpoints["qwen2_moe"]
    num_layers = SMALL_CONFIGS["qwen2_moe"]["num_hidden_layers"]
    num_batches = len(batch_shapes(Tokenizer.from_dir(directory), CORPUS, BATCH_SIZE))
    main = threading.get_ident()

    events = record_layers(monkeypatch, num_layers, wait_for_next=True)
    ahead = streamed(directory, LARGE_BUDGET, tmp_path, prefetch=True)
    with_prefetch = ahead.encode(CORPUS, "moee-concat", batch_size=BATCH_SIZE)
    builds = {layer: i for i, (what, layer, _, _) in enumerate(events) if what == "build"}
    forwards = defaultdict(list)
    for i, (what, layer, _, _) in enumerate(events):
        if what == "forward":
            forwards[layer].append(i)
    assert sorted(builds) == list(range(num_layers))  # each layer built once
    assert all(len(forwards[layer]) == num_batches for layer in range(num_layers))  # every batch through every layer
    assert all(max(forwards[layer]) < min(forwards[layer + 1]) for layer in range(num_layers - 1))  # layer-major
    assert all(thread != main for what, _, thread, _ in events if what == "build")  # built off the main thread
    for layer in range(num_layers - 1):
        # Layer l + 1 was requested before the first batch of layer l ran ...
        assert builds[layer + 1] < min(forwards[layer]), layer
    for layer in range(num_layers - 2):
        # ... but layer l + 2 only after the last batch of layer l: never more than two layers.
        assert builds[layer + 2] > max(forwards[layer]), layer
    assert all(alive <= 2 for what, _, _, alive in events if what == "forward")
    assert all(alive <= 1 for what, _, _, alive in events if what == "build")

    events.clear()
    monkeypatch.undo()
    events = record_layers(monkeypatch, num_layers, wait_for_next=False)
    plain = streamed(directory, LARGE_BUDGET, tmp_path, prefetch=False)
    without_prefetch = plain.encode(CORPUS, "moee-concat", batch_size=BATCH_SIZE)
    # Strictly one layer after the other: build l, all batches of l, then build l + 1.
    expected = [(what, layer) for layer in range(num_layers) for what in ["build"] + ["forward"] * num_batches]
    assert [(what, layer) for what, layer, _, _ in events] == expected
    assert all(alive == 1 for what, _, _, alive in events if what == "forward")
    np.testing.assert_array_equal(without_prefetch, with_prefetch)


# ---------------------------------------------------------------------------
# Memory budgets


@pytest.mark.parametrize(
    "text, value",
    [("8GB", 8 * 2**30), ("512MiB", 512 * 2**20), ("2.5G", int(2.5 * 2**30)), ("64k", 64 * 2**10),
     ("1234", 1234), (" 3 gb ", 3 * 2**30), (4096, 4096)],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize(
    "text, message",
    [
        ("lots", "memory budget 'lots' is not a size; write it like 8GB, 512MB or 2.5G"),
        ("-1GB", "memory budget '-1GB' is not a size; write it like 8GB, 512MB or 2.5G"),
        ("8 XB", "memory budget '8 XB' is not a size; write it like 8GB, 512MB or 2.5G"),
        ("", "memory budget '' is not a size; write it like 8GB, 512MB or 2.5G"),
        ("0", "memory budget must be positive, got '0'"),
        (0, "memory budget must be positive, got 0"),
        (-5, "memory budget must be positive, got -5"),
    ],
)
def test_bad_budgets(checkpoints, text, message):
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        parse_bytes(text)
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        MoEEmbedder.from_pretrained(checkpoints["olmoe"], dtype=torch.float32, memory_budget=text)


def test_budget_too_small_names_the_smallest_that_works(checkpoints, tmp_path):
    directory = checkpoints["olmoe"]
    smallest = smallest_budget(directory)
    assert smallest >= 2**28  # the runtime allowance alone is 256 MiB: printed in GiB
    embedder = streamed(directory, smallest - 1, tmp_path)
    with pytest.raises(InputError) as info:
        embedder.encode(CORPUS, "hs", batch_size=BATCH_SIZE)
    message = str(info.value)
    assert "too small for one layer" in message
    printed = re.search(r"the smallest budget that works is ([0-9.]+ GiB) ", message).group(1)
    # memory_plan's figure, rounded up to the 0.01 GiB shown, so that it works as printed.
    assert printed == f"{math.ceil(smallest / 2**30 * 100) / 100:.2f} GiB"
    assert smallest <= parse_bytes(printed) < smallest + 0.01 * 2**30
    assert embedder.model.stats.weight_bytes_read == 0  # refused before reading a weight
    assert os.listdir(tmp_path) == []

    retry = streamed(directory, printed, tmp_path)
    retry.encode(CORPUS, "hs", batch_size=BATCH_SIZE)
    assert retry.model.stats.weight_bytes_read > 0


# ---------------------------------------------------------------------------
# Spilling failures leave nothing behind


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs: too small for the corpus's activations (root only; skipped where mount is refused)."""
    target = tmp_path / "tiny"
    target.mkdir()
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield target
    subprocess.run(["umount", str(target)], check=True)


def test_full_disk_while_spilling(checkpoints, tiny_fs):
    directory = checkpoints["olmoe"]
    embedder = streamed(directory, smallest_budget(directory), tiny_fs)
    with pytest.raises(SpillError) as info:
        embedder.encode(CORPUS, "hs", batch_size=BATCH_SIZE)
    assert isinstance(info.value, OSError) and isinstance(info.value, MoEERefError)
    assert info.value.__cause__.errno == errno.ENOSPC
    message = str(info.value)
    assert message.startswith("no room to spill ") and f"of activations in {tiny_fs}:" in message
    assert "free disk space" in message and "raise the memory budget" in message
    d = SMALL_CONFIGS["olmoe"]["hidden_size"]
    needed = sum(b * t * d * 4 for b, t in batch_shapes(embedder.tokenizer, CORPUS, BATCH_SIZE))
    assert needed > 64 * 2**10  # really more than the filesystem holds
    assert os.listdir(tiny_fs) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EACCES])
def test_spill_reservation_failure(checkpoints, tmp_path, monkeypatch, code):
    """The same, with the reservation failing by hand (works without root)."""

    def no_room(fd, offset, length):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    directory = checkpoints["olmoe"]
    embedder = streamed(directory, smallest_budget(directory), tmp_path)
    with pytest.raises(SpillError) as info:
        embedder.encode(CORPUS, "hs", batch_size=BATCH_SIZE)
    message = str(info.value)
    if code == errno.EACCES:
        assert message.startswith(f"cannot create the spill file in {tmp_path}: ")
        assert os.strerror(code) in message
    else:
        assert message.startswith("no room to spill ") and f"in {tmp_path}: free disk space" in message
        assert "raise the memory budget" in message
    assert os.listdir(tmp_path) == []


def test_missing_spill_dir(checkpoints, tmp_path):
    directory = checkpoints["olmoe"]
    missing = tmp_path / "nowhere"
    embedder = streamed(directory, smallest_budget(directory), missing)
    with pytest.raises(SpillError, match=f"^cannot create a spill directory in {re.escape(str(missing))}: "):
        embedder.encode(CORPUS, "hs", batch_size=BATCH_SIZE)
    assert not missing.exists()
    # Nothing needs to spill with a large budget: the missing directory is never touched.
    fine = streamed(directory, LARGE_BUDGET, missing)
    assert fine.encode(CORPUS, "hs", batch_size=BATCH_SIZE).shape == (len(CORPUS), SMALL_CONFIGS["olmoe"]["hidden_size"])


@pytest.mark.parametrize("where", ["forward", "build"])
def test_error_mid_run_leaves_no_spill_files(checkpoints, tmp_path, monkeypatch, where):
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    during = []
    real_build, real_forward = StreamedModel.build_layer, Block.forward

    def build_layer(self, layer):
        if where == "build" and layer == 2:
            during.append(os.listdir(spill_dir))
            raise RuntimeError("boom while building layer 2")
        block = real_build(self, layer)
        block.test_layer = layer
        return block

    def forward(self, *args, **kwargs):
        if where == "forward" and self.test_layer == 2:
            during.append(os.listdir(spill_dir))
            raise RuntimeError("boom in layer 2")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(StreamedModel, "build_layer", build_layer)
    monkeypatch.setattr(Block, "forward", forward)
    directory = checkpoints["deepseek"]
    embedder = streamed(directory, smallest_budget(directory), spill_dir)
    with pytest.raises(RuntimeError, match="^boom"):
        embedder.encode(CORPUS, "hs", batch_size=BATCH_SIZE)
    assert during and during[0] == [] and embedder.model.stats.spilled  # it was spilling, with no name on disk
    assert os.listdir(spill_dir) == []


# ---------------------------------------------------------------------------
# What the streamed mode refuses


@pytest.fixture(scope="module")
def streamed_olmoe(checkpoints, tmp_path_factory):
    return streamed(checkpoints["olmoe"], LARGE_BUDGET, tmp_path_factory.mktemp("spill"))


def test_streamed_refuses_mean_of_layers(streamed_olmoe):
    streamed_olmoe.model.stats.weight_bytes_read = -1  # a sentinel: any run would reset it
    with pytest.raises(
        InputError, match=r"^hs_layer='mean' is not available in the layer-streamed mode; use hs_layer='last'$"
    ):
        streamed_olmoe.encode(CORPUS, "hs", hs_layer="mean")
    assert streamed_olmoe.model.stats.weight_bytes_read == -1


def test_streamed_refuses_official_mode(streamed_olmoe):
    message = "run_batch needs a resident model; the layer-streamed mode works on whole corpora (features())"
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        encode_official(streamed_olmoe, CORPUS, "moee-sum")
    batch = streamed_olmoe.tokenizer.pad(streamed_olmoe.tokenizer.tokenize(CORPUS[:2])[0])
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        streamed_olmoe.run_batch(batch.input_ids, batch.attention_mask, FeatureOptions(), [0])


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.tensor([[5, 6, 512]]), "token id 512 is outside the vocabulary [0, 512); check the tokenizer"),
        (torch.tensor([[-1, 6, 7]]), "token id -1 is outside the vocabulary [0, 512); check the tokenizer"),
        (torch.full((1, 513), 7), "sequence length 513 exceeds max_position_embeddings=512; truncate the input (tokenizer max_length)"),
    ],
)
def test_run_refuses_bad_ids(streamed_olmoe, ids, message):
    good = torch.tensor([[5, 6, 7]])
    batches = [(good, torch.ones_like(good), None), (ids, torch.ones_like(ids), None)]
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        streamed_olmoe.model.run(batches)
    assert streamed_olmoe.model.stats.weight_bytes_read == 0  # checked before any weight is read


def test_run_of_no_batches(streamed_olmoe):
    assert streamed_olmoe.model.run([]) == []
    assert streamed_olmoe.model.stats.weight_bytes_read == 0


# ---------------------------------------------------------------------------
# The prompt's shared opening, run once beside the batches


@pytest.fixture
def spy_prefixes(monkeypatch):
    """(prefix_ids, continues) of every StreamedModel.run call."""
    calls = []
    real_run = StreamedModel.run

    def run(self, batches, *args, prefix_ids=None, continues=None, **kwargs):
        calls.append((prefix_ids, continues))
        return real_run(self, batches, *args, prefix_ids=prefix_ids, continues=continues, **kwargs)

    monkeypatch.setattr(StreamedModel, "run", run)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_shared_opening_equals_resident(checkpoints, resident, family, tmp_path, spy_prefixes):
    directory = checkpoints[family]
    tokenizer = Tokenizer.from_dir(directory)
    template = resolve_prompt("prompteol")
    opening = shared_prefix_ids(tokenizer, template)
    # The batches the embedder streams: the prompts without their opening, longest first.
    lengths = sorted((len(ids) - len(opening) for ids in tokenizer.tokenize([apply_prompt(template, t) for t in CORPUS])[0]), reverse=True)
    shapes = [(len(lengths[i : i + BATCH_SIZE]), lengths[i]) for i in range(0, len(lengths), BATCH_SIZE)]
    smallest = StreamedModel(directory, memory_budget=LARGE_BUDGET).memory_plan(shapes)["smallest"]
    embedder = streamed(directory, smallest, tmp_path)  # spilling as well
    options = FeatureOptions(prompt="prompteol")
    ours = embedder.features(CORPUS, options, batch_size=BATCH_SIZE)
    assert spy_prefixes == [(list(opening), [True] * 7)] and embedder.model.stats.spilled
    reference = resident[family]
    reference.share_prefix = False
    try:
        whole = reference.features(CORPUS, options, batch_size=BATCH_SIZE)
    finally:
        reference.share_prefix = True
    shared = reference.features(CORPUS, options, batch_size=BATCH_SIZE)
    for ref in (whole, shared):
        assert max_rel_error(ours.hs, ref.hs) <= TOLERANCE
        assert max_rel_error(ours.rw, ref.rw) <= TOLERANCE


def test_streamed_run_mixes_continuing_and_whole_batches(checkpoints, resident, tmp_path):
    directory = checkpoints["qwen2_moe"]
    model = resident["qwen2_moe"].model
    stream = StreamedModel(directory, memory_budget=LARGE_BUDGET, spill_dir=str(tmp_path))
    opening = [11, 12, 13]
    tail = torch.tensor([[0, 21, 22, 23], [31, 32, 33, 34]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    whole = torch.tensor([[0, 0, 11, 12, 13, 41], [11, 12, 13, 51, 52, 53]])
    whole_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    keep = lambda ids: torch.full((2, 1), ids.shape[1] - 1)  # noqa: E731
    outs = stream.run([(tail, mask, keep(tail)), (whole, whole_mask, keep(whole))], prefix_ids=opening, continues=[True, False])
    with torch.inference_mode():
        ref_tail = model(tail, mask, keep_positions=keep(tail), prefix=model.encode_prefix(opening))
        ref_whole = model(whole, whole_mask, keep_positions=keep(whole))
    for out, ref in zip(outs, (ref_tail, ref_whole)):
        assert max_rel_error(out.hidden_states, ref.hidden_states) <= TOLERANCE
        assert float((out.router_probs - ref.router_probs).abs().max()) <= TOLERANCE


def test_streamed_run_refuses_flags_without_prefix(streamed_olmoe):
    good = torch.tensor([[5, 6, 7]])
    batches = [(good, torch.ones_like(good), None)]
    message = "continues needs one flag per batch, and prefix_ids for the batches it flags"
    for kwargs in ({"continues": [True]}, {"prefix_ids": [1, 2], "continues": [True, False]}):
        with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
            streamed_olmoe.model.run(batches, **kwargs)
    too_long = torch.full((1, 511), 7)
    with pytest.raises(InputError, match=r"^prefix \(2 tokens\) and input \(511\) exceed max_position_embeddings=512; truncate the input$"):
        streamed_olmoe.model.run([(too_long, torch.ones_like(too_long), None)], prefix_ids=[1, 2], continues=[True])


def test_a_run_that_fails_half_way_leaves_grad_mode_as_it_was(checkpoints, tmp_path, monkeypatch):
    """A layer whose computation fails while streaming leaves no inference mode behind in the caller's
    thread, not even once the abandoned layer generator is collected."""
    import gc

    from moee_ref.decoder.model import Block

    embedder = streamed(checkpoints["olmoe"], LARGE_BUDGET, tmp_path)
    calls = []
    real = Block.forward

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise FloatingPointError("layer failed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Block, "forward", forward)
    with pytest.raises(FloatingPointError, match="layer failed") as failure:
        embedder.encode(CORPUS[:2], "hs", batch_size=BATCH_SIZE)
    del failure
    gc.collect()
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    x = torch.ones(2, requires_grad=True)
    (x * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 3.0))
