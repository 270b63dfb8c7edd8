"""Loading checkpoints: sharded and single-file safetensors, every way a checkpoint can be
broken (each a CheckpointError naming the problem), pickle refused without being touched,
hub ids offline and online (mocked), and layer-by-layer streaming."""

from __future__ import annotations

import dataclasses

import json
import re
import pickle
import shutil
import threading
import weakref
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moee_ref
import moee_ref.families
from moee_ref.loading import checkpoint
from moee_ref.loading.checkpoint import INDEX_FILE, name_map_groups
from moee_ref.errors import CheckpointError, ConfigError, InputError, ModelNotFoundError, UnsafeCheckpointError
from moee_ref.families.names import leaves
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint

FAMILIES = tuple(moee_ref.families.FAMILIES)  # every supported family
SHARD_BYTES = 2**17  # small shards: every small checkpoint is spread over many files


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One float32 sharded synthetic checkpoint per family, written once; tests copy before breaking one."""
    root = tmp_path_factory.mktemp("ckpt")
    return {
        family: write_random_checkpoint(root / family, SMALL_CONFIGS[family], seed=7, max_shard_bytes=SHARD_BYTES, tokenizer=False)
        for family in FAMILIES
    }


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return write_random_checkpoint(
        root / "deepseek", SMALL_CONFIGS["deepseek"], dtype="bfloat16", seed=3, max_shard_bytes=SHARD_BYTES, tokenizer=False
    )


def copy_of(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / directory.name
    shutil.copytree(directory, target)
    return target


def index_of(directory: Path) -> dict[str, str]:
    return json.loads((directory / INDEX_FILE).read_text())["weight_map"]


def raw_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as stored, read independently of the loader."""
    state = {}
    for file in sorted(set(index_of(directory).values())):
        state.update(load_file(str(directory / file)))
    return state


def rewrite_shard_of(directory: Path, tensor_name: str, change) -> Path:
    """Rewrite the shard holding tensor_name after change(dict of its tensors) has edited it."""
    file = directory / index_of(directory)[tensor_name]
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return file


# ---------------------------------------------------------------------------
# Loading what is there


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_sharded_checkpoint(checkpoints, family):
    directory = checkpoints[family]
    shards = sorted(set(index_of(directory).values()))
    assert len(shards) >= 5  # genuinely sharded
    model = moee_ref.load_model(directory)
    args = model.args
    # The config's args, with the expert layout the shards hold (gpt-oss's demo: transformers' fused one)
    assert dataclasses.replace(args, fused_experts=False) == moee_ref.read_config(directory) and args.family == family
    assert args.fused_experts == (family == "gpt_oss")
    assert model.source_dir == directory

    # Each parameter is the checkpoint tensor(s) it stands for: checked by hand, not through the name map.
    state = raw_state(directory)
    assert torch.equal(model.embed.weight, state["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])
    assert torch.equal(model.norm.weight, state["model.norm.weight"])
    for layer in range(args.num_layers):
        block, ckpt = model.layers[layer], f"model.layers.{layer}"
        if family == "deepseek_v2":  # latent attention: the demo config has a query latent
            assert torch.equal(block.attn.q_b_proj.weight, state[f"{ckpt}.self_attn.q_b_proj.weight"])
            assert torch.equal(block.attn.kv_a_proj.weight, state[f"{ckpt}.self_attn.kv_a_proj_with_mqa.weight"])
            assert torch.equal(block.attn.kv_a_norm.weight, state[f"{ckpt}.self_attn.kv_a_layernorm.weight"])
        else:
            assert torch.equal(block.attn.q_proj.weight, state[f"{ckpt}.self_attn.q_proj.weight"])
        assert torch.equal(block.attn.o_proj.weight, state[f"{ckpt}.self_attn.o_proj.weight"])
        assert torch.equal(block.attn_norm.weight, state[f"{ckpt}.input_layernorm.weight"])
        assert torch.equal(block.mlp_norm.weight, state[f"{ckpt}.post_attention_layernorm.weight"])
        if family in ("olmoe", "qwen3_moe"):  # over the whole projection, or one [head_dim] weight per layer
            assert torch.equal(block.attn.k_norm.weight, state[f"{ckpt}.self_attn.k_norm.weight"])
        if family == "qwen2_moe":
            assert torch.equal(block.attn.v_proj.bias, state[f"{ckpt}.self_attn.v_proj.bias"])
        if layer not in args.moe_layers:
            assert torch.equal(block.mlp.gate.weight, state[f"{ckpt}.mlp.gate_proj.weight"])
            assert torch.equal(block.mlp.up.weight, state[f"{ckpt}.mlp.up_proj.weight"])
            assert torch.equal(block.mlp.down.weight, state[f"{ckpt}.mlp.down_proj.weight"])
            continue
        if family == "gpt_oss":  # transformers' layout: x @ W, gate and up alternating along the 2I axis
            assert torch.equal(block.mlp.router.bias, state[f"{ckpt}.mlp.router.bias"])
            stored = state[f"{ckpt}.mlp.experts.gate_up_proj"]  # [E, D, 2I]
            assert torch.equal(block.mlp.experts.gate_up, torch.cat((stored[..., 0::2], stored[..., 1::2]), dim=-1).transpose(1, 2))
            assert torch.equal(block.mlp.experts.down, state[f"{ckpt}.mlp.experts.down_proj"].transpose(1, 2))
            bias = state[f"{ckpt}.mlp.experts.gate_up_proj_bias"]
            assert torch.equal(block.mlp.experts.gate_up_bias, torch.cat((bias[:, 0::2], bias[:, 1::2]), dim=-1))
            assert torch.equal(block.attn.sinks, state[f"{ckpt}.self_attn.sinks"])
            assert torch.equal(block.attn.o_proj.bias, state[f"{ckpt}.self_attn.o_proj.bias"])
            continue
        # Mixtral's released names: block_sparse_moe, experts' w1 (gate), w3 (up), w2 (down).
        moe, (gate, up, down) = ("block_sparse_moe", ("w1", "w3", "w2")) if family == "mixtral" else ("mlp", ("gate_proj", "up_proj", "down_proj"))
        assert torch.equal(block.mlp.router.weight, state[f"{ckpt}.{moe}.gate.weight"])
        for e in (0, args.num_experts - 1):
            expert = f"{ckpt}.{moe}.experts.{e}"
            gate_up = torch.cat([state[f"{expert}.{gate}.weight"], state[f"{expert}.{up}.weight"]])
            assert torch.equal(block.mlp.experts.gate_up[e], gate_up)
            assert torch.equal(block.mlp.experts.down[e], state[f"{expert}.{down}.weight"])
        shared = {"qwen2_moe": "shared_expert", "deepseek": "shared_experts", "deepseek_v2": "shared_experts"}.get(family)
        if shared:
            assert torch.equal(block.mlp.shared.down.weight, state[f"{ckpt}.mlp.{shared}.down_proj.weight"])
        if family == "qwen2_moe":
            assert torch.equal(block.mlp.shared_gate.weight, state[f"{ckpt}.mlp.shared_expert_gate.weight"])


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_single_file_checkpoint(checkpoints, family, tmp_path):
    directory = copy_of(checkpoints[family], tmp_path)
    state = raw_state(directory)
    for file in set(index_of(directory).values()):
        (directory / file).unlink()
    (directory / INDEX_FILE).unlink()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})

    single = moee_ref.load_model(directory)
    sharded = moee_ref.load_model(checkpoints[family])
    single_params, sharded_params = dict(single.named_parameters()), dict(sharded.named_parameters())
    assert single_params.keys() == sharded_params.keys()
    assert all(torch.equal(single_params[n], sharded_params[n]) for n in single_params)


def test_qwen_without_shared_expert_loads(tmp_path):
    config = {**SMALL_CONFIGS["qwen2_moe"], "shared_expert_intermediate_size": 0}
    directory = write_random_checkpoint(tmp_path / "qwen", config, tokenizer=False)
    model = moee_ref.load_model(directory)
    assert all(block.mlp.shared is None and block.mlp.shared_gate is None for block in model.layers)
    out = model(torch.tensor([[1, 2, 3]]))
    assert bool(torch.isfinite(out.hidden_states).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_parameters_have_requested_dtype_and_no_grad(checkpoints, dtype):
    model = moee_ref.load_model(checkpoints["qwen2_moe"], dtype=dtype)
    params = list(model.named_parameters())
    assert len(params) > 0
    assert all(p.dtype == dtype for _, p in params)
    assert not any(p.requires_grad for _, p in params)
    assert not any(p.is_meta for _, p in params)
    assert not model.training and not any(m.training for m in model.modules())
    assert model.dtype == dtype


def test_unsupported_dtype(checkpoints):
    with pytest.raises(InputError, match=r"^dtype torch.int32 is not supported; use auto, torch.float32, torch.bfloat16, torch.float64 or torch.float16$"):
        moee_ref.load_model(checkpoints["olmoe"], dtype=torch.int32)
    with pytest.raises(InputError, match=r"^unknown dtype 'bf16'; use one of auto, float32, float64, bfloat16, float16$"):
        moee_ref.load_model(checkpoints["olmoe"], dtype="bf16")


def test_int8_with_float64_is_refused(checkpoints):
    with pytest.raises(CheckpointError, match=r"^int8=True does not combine with float64, the exact reference mode; use dtype float32 or bfloat16 with int8$"):
        moee_ref.load_model(checkpoints["olmoe"], dtype=torch.float64, int8=True)


def test_bfloat16_storage_loads_exactly_as_float32(bf16_checkpoint):
    state = raw_state(bf16_checkpoint)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    model = moee_ref.load_model(bf16_checkpoint, dtype=torch.float32)
    assert model.embed.weight.dtype == torch.float32
    # bf16 -> fp32 is exact (bf16 is the top half of fp32), so equality, not closeness.
    assert torch.equal(model.embed.weight, state["model.embed_tokens.weight"].float())
    assert torch.equal(model.layers[0].mlp.down.weight, state["model.layers.0.mlp.down_proj.weight"].float())
    assert torch.equal(model.layers[2].mlp.experts.down[5], state["model.layers.2.mlp.experts.5.down_proj.weight"].float())
    # and no value was rounded on the way: converting back gives the stored bits
    assert torch.equal(model.layers[3].mlp.router.weight.bfloat16(), state["model.layers.3.mlp.gate.weight"])


# ---------------------------------------------------------------------------
# Broken checkpoints


def test_missing_shard_is_named(checkpoints, tmp_path):
    directory = copy_of(checkpoints["olmoe"], tmp_path)
    victim = sorted(set(index_of(directory).values()))[2]
    (directory / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"shard\(s\) listed in {INDEX_FILE} are missing: {victim}"):
        moee_ref.load_model(directory)


def test_invalid_index_file(checkpoints, tmp_path):
    directory = copy_of(checkpoints["olmoe"], tmp_path)
    (directory / INDEX_FILE).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"not a valid safetensors index"):
        moee_ref.load_model(directory)
    (directory / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"not a valid safetensors index"):
        moee_ref.load_model(directory)


@pytest.mark.parametrize("damage", ["half", "last-byte", "garbage-header", "bad-json-header", "empty"])
def test_damaged_shard_is_a_checkpoint_error(checkpoints, tmp_path, damage):
    directory = copy_of(checkpoints["deepseek"], tmp_path)
    victim = directory / sorted(set(index_of(directory).values()))[1]
    data = victim.read_bytes()
    if damage == "half":
        data = data[: len(data) // 2]
    elif damage == "last-byte":
        data = data[:-1]
    elif damage == "garbage-header":
        data = b"\xde\xad\xbe\xef" * 4 + data[16:]
    elif damage == "bad-json-header":
        header_len = int.from_bytes(data[:8], "little")
        data = data[:8] + b"#" * header_len + data[8 + header_len :]  # right length, not JSON
    else:
        data = b""
    victim.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"{victim.name}: not a readable safetensors file .*re-download it") as info:
        moee_ref.load_model(directory)
    assert type(info.value) is CheckpointError


def test_wrong_shape_names_tensor_and_both_shapes(checkpoints, tmp_path):
    directory = copy_of(checkpoints["qwen2_moe"], tmp_path)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"  # expected [32, 64]

    def reshape(tensors):
        tensors[name] = torch.zeros(33, 64)

    rewrite_shard_of(directory, name, reshape)
    with pytest.raises(CheckpointError, match=rf"1 wrongly shaped tensors: {name} \(checkpoint \[33, 64\], expected \[32, 64\]\)"):
        moee_ref.load_model(directory)


def test_missing_tensor_is_named(checkpoints, tmp_path):
    directory = copy_of(checkpoints["olmoe"], tmp_path)
    name = "model.layers.2.self_attn.q_norm.weight"
    rewrite_shard_of(directory, name, lambda tensors: tensors.pop(name))
    with pytest.raises(CheckpointError, match=rf"1 missing tensors: {name}\. Check that config.json belongs to these weights"):
        moee_ref.load_model(directory)


def test_unexpected_tensor_is_named(checkpoints, tmp_path):
    directory = copy_of(checkpoints["deepseek"], tmp_path)
    anchor = "model.layers.0.self_attn.q_proj.weight"
    extra = "model.layers.0.self_attn.extra_proj.weight"

    def add(tensors):
        tensors[extra] = torch.ones(8)

    rewrite_shard_of(directory, anchor, add)
    with pytest.raises(CheckpointError, match=rf"1 unexpected tensors: {extra}"):
        moee_ref.load_model(directory)


def test_rotary_inv_freq_buffers_are_ignored(checkpoints, tmp_path):
    """Older LLaMA-style checkpoints carry rotary inv_freq buffers; they are recomputed, not weights."""
    directory = copy_of(checkpoints["deepseek"], tmp_path)
    anchor = "model.layers.0.self_attn.q_proj.weight"
    extra = "model.layers.0.self_attn.rotary_emb.inv_freq"

    def add(tensors):
        tensors[extra] = torch.ones(8)

    rewrite_shard_of(directory, anchor, add)
    reference = moee_ref.load_model(checkpoints["deepseek"])
    model = moee_ref.load_model(directory)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(model(ids).hidden_states, reference(ids).hidden_states)


def test_config_for_other_weights_lists_all_problems(checkpoints, tmp_path):
    # The checkpoint of a 4-layer model read with a config of 3 layers: layer 3 is unexpected.
    directory = copy_of(checkpoints["olmoe"], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.3\..* and \d+ more"):
        moee_ref.load_model(directory)


def test_missing_config(checkpoints, tmp_path):
    directory = copy_of(checkpoints["olmoe"], tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"no config.json found"):
        moee_ref.load_model(directory)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle fails the test loudly (and is also recorded, in case the error is caught)."""
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise AssertionError("pickle-based weights must never be loaded")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    return calls


def test_pickle_only_checkpoint_is_refused(checkpoints, tmp_path, no_unpickling):
    directory = tmp_path / "pickled"
    directory.mkdir()
    shutil.copy(checkpoints["olmoe"] / "config.json", directory)
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle, never to be opened")
    with pytest.raises(UnsafeCheckpointError, match=r"only pickle-based weights \(pytorch_model.bin\)\. Loading pickle can run arbitrary code"):
        moee_ref.load_model(directory)
    assert no_unpickling == []


def test_safetensors_preferred_over_pickle(checkpoints, tmp_path, no_unpickling):
    directory = copy_of(checkpoints["olmoe"], tmp_path)
    (directory / "pytorch_model.bin").write_bytes(b"never to be opened")
    model = moee_ref.load_model(directory)
    assert model.args.family == "olmoe"
    assert no_unpickling == []


def test_no_weights_at_all(checkpoints, tmp_path):
    directory = tmp_path / "empty"
    directory.mkdir()
    shutil.copy(checkpoints["olmoe"] / "config.json", directory)
    with pytest.raises(CheckpointError, match=rf"no model.safetensors or {INDEX_FILE}; the weights must be in safetensors format") as info:
        moee_ref.load_model(directory)
    assert type(info.value) is CheckpointError


# ---------------------------------------------------------------------------
# Sources: hub ids and things that are neither directories nor ids


@pytest.fixture
def record_downloads(monkeypatch):
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("no download expected")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


@pytest.mark.parametrize("source", ["no-such-model", "a/b/c", "./missing/dir", "/definitely/not/here", "owner/", "~/not-here"])
def test_source_neither_directory_nor_hub_id(tmp_path, monkeypatch, record_downloads, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"no such directory, and not a hub id of the form 'owner/name'") as info:
        moee_ref.load_model(source)
    assert type(info.value) is CheckpointError
    assert record_downloads == []


def test_source_that_is_a_file(checkpoints, record_downloads):
    with pytest.raises(CheckpointError, match=r"config.json is a file; pass the checkpoint directory"):
        moee_ref.load_model(checkpoints["olmoe"] / "config.json")
    assert record_downloads == []


def test_hub_id_offline_is_model_not_found(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    # huggingface_hub reads these environment variables once, at import, into its constants
    # module (is_offline_mode() returns constants.HF_HUB_OFFLINE; snapshot_download reads
    # constants.HF_HUB_CACHE at call time), so the constants are patched as well.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # no local directory of that name

    hub_id = "allenai/OLMoE-1B-7B-0924"
    with pytest.raises(ModelNotFoundError) as info:
        moee_ref.load_model(hub_id)
    message = str(info.value)
    assert f"could not get '{hub_id}' from the Hugging Face hub" in message
    assert f"huggingface-cli download {hub_id}" in message
    assert message.endswith("and pass that local directory instead")
    # Offline mode really was in force: the failure comes from it, not from a network error.
    cause = info.value.__cause__
    assert isinstance(cause, LocalEntryNotFoundError)
    assert isinstance(cause.__cause__, OfflineModeIsEnabled)
    assert isinstance(info.value, CheckpointError)


# Files a hub repository may hold that must never be fetched: pickled weights and code.
NEVER_FETCH = [
    "pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "training_args.bin", "model.pt", "weights.pth",
    "model.ckpt", "optimizer.pkl", "modeling_deepseek.py", "configuration_deepseek.py", "tokenization_x.py",
    "sub/dir/model.bin", "sub/dir/code.py", "original/consolidated.00.pth",
]
MUST_FETCH = [
    "config.json", "model.safetensors", "model-00001-of-00004.safetensors", INDEX_FILE, "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json",
]


def test_hub_download_fetches_only_safe_files(checkpoints, tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(checkpoints["deepseek"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    model = moee_ref.load_model("deepseek-ai/deepseek-moe-16b-base")
    assert model.args.family == "deepseek" and model.source_dir == checkpoints["deepseek"]

    [(repo_id, kwargs)] = calls
    assert repo_id == "deepseek-ai/deepseek-moe-16b-base"
    patterns = kwargs.get("allow_patterns")
    assert isinstance(patterns, list) and patterns  # None would mean "everything"
    # Filter with huggingface_hub's own matcher, as snapshot_download does.
    filtering = dict(allow_patterns=patterns, ignore_patterns=kwargs.get("ignore_patterns"))
    assert list(filter_repo_objects(NEVER_FETCH, **filtering)) == []
    assert list(filter_repo_objects(MUST_FETCH, **filtering)) == MUST_FETCH
    for pattern in patterns:
        assert not pattern.endswith((".bin", ".py", ".pt", ".pth", "*"))


# ---------------------------------------------------------------------------
# Streaming: shards opened and tensors materialised one layer group at a time


class LoadTracker:
    """Watches every shard handle and every tensor the loader reads through checkpoint._open."""

    def __init__(self):
        self.group = None  # index of the _OpenShards step in progress (None: header scan)
        self.steps = 0
        self.open_handles: dict[int, int | None] = {}  # id(handle) -> group it was opened in
        self.reads: list[tuple[int | None, str, int]] = []  # (group, tensor name, bytes)
        self.alive: list[weakref.ref] = []  # every tensor handed out, weakly
        self.alive_bytes: dict[int, int] = {}
        self.peak_alive_bytes = 0

    def record_tensor(self, name: str, tensor: torch.Tensor) -> None:
        # Any other handle still open must belong to this same group.
        stale = [g for g in self.open_handles.values() if g != self.group]
        assert not stale, f"reading {name} in group {self.group} with handles of groups {stale} still open"
        size = tensor.numel() * tensor.element_size()
        self.reads.append((self.group, name, size))
        key = len(self.alive)
        self.alive_bytes[key] = size
        self.alive.append(weakref.ref(tensor, lambda _ref, key=key: self.alive_bytes.pop(key, None)))
        self.peak_alive_bytes = max(self.peak_alive_bytes, sum(self.alive_bytes.values()))


class TrackedFile:
    """A shard file opened for reading tensor data, whose opening and closing the tracker sees."""

    def __init__(self, inner, tracker: LoadTracker):
        self.inner, self.tracker = inner, tracker

    def __enter__(self):
        self.inner.__enter__()
        self.tracker.open_handles[id(self)] = self.tracker.group
        return self

    def __exit__(self, *exc):
        del self.tracker.open_handles[id(self)]
        return self.inner.__exit__(*exc)

    def fileno(self):
        assert id(self) in self.tracker.open_handles, "tensor read from a file that is not open"
        return self.inner.fileno()


@pytest.fixture
def tracker(monkeypatch):
    tracker = LoadTracker()
    real_open_data, real_read = checkpoint._open_data, checkpoint._OpenShards.read
    real_enter, real_exit = checkpoint._OpenShards.__enter__, checkpoint._OpenShards.__exit__

    def enter(self):
        assert tracker.group is None, "loading steps nested"
        tracker.group = tracker.steps
        tracker.steps += 1
        return real_enter(self)

    def exit_(self, *exc):
        result = real_exit(self, *exc)
        leftover = [g for g in tracker.open_handles.values() if g == tracker.group]
        assert not leftover, f"group {tracker.group} left {len(leftover)} shard handle(s) open"
        tracker.group = None
        return result

    def read(self, name):
        tensor = real_read(self, name)
        tracker.record_tensor(name, tensor)
        return tensor

    monkeypatch.setattr(checkpoint, "_open_data", lambda file: TrackedFile(real_open_data(file), tracker))
    monkeypatch.setattr(checkpoint._OpenShards, "read", read)
    monkeypatch.setattr(checkpoint._OpenShards, "__enter__", enter)
    monkeypatch.setattr(checkpoint._OpenShards, "__exit__", exit_)
    return tracker


def test_loading_streams_one_layer_at_a_time(bf16_checkpoint, tracker):
    args = moee_ref.read_config(bf16_checkpoint)
    groups = name_map_groups(args)
    group_leaves = [[leaf for recipe in group.values() for leaf in leaves(recipe)] for group in groups]
    group_bytes = [2 * sum(torch.Size(leaf.shape).numel() for leaf in names) for names in group_leaves]  # bf16: 2 bytes
    largest, total = max(group_bytes), sum(group_bytes)
    assert total > 2 * largest  # otherwise "one group at a time" and "everything at once" look alike

    model = moee_ref.load_model(bf16_checkpoint, dtype=torch.float32)
    assert model.dtype == torch.float32

    # Every tensor was read exactly once, through the tracked shard files (a loader that
    # bypassed them, e.g. with safetensors.torch.load_file, would read none here).
    read_names = [name for _, name, _ in tracker.reads]
    assert sorted(read_names) == sorted(leaf.name for names in group_leaves for leaf in names)
    # No tensor data was read during the header scan: only inside loading steps.
    assert all(group is not None for group, _, _ in tracker.reads)
    # One step per group (embeddings, each layer, final norm and head), each reading its own tensors.
    assert tracker.steps == len(groups) == args.num_layers + 2
    for index, names in enumerate(group_leaves):
        assert sorted(n for g, n, _ in tracker.reads if g == index) == sorted(leaf.name for leaf in names)
        assert sum(b for g, _, b in tracker.reads if g == index) <= largest
    # Every shard handle was closed, and the raw (bf16) tensors read from the shards never
    # added up to more than the largest group: they die once converted, group by group.
    assert tracker.open_handles == {}
    assert 0 < tracker.peak_alive_bytes <= largest
    assert tracker.alive_bytes == {}  # no raw tensor outlives loading (all were converted to fp32)


def test_tensor_stored_in_two_shards_is_refused(checkpoints, tmp_path):
    """Shards that do not belong together must not be mixed silently (the last one read would win)."""
    directory = copy_of(checkpoints["deepseek"], tmp_path)
    anchor = "model.layers.0.self_attn.q_proj.weight"
    files = sorted(directory.glob("*.safetensors"))
    holder = next(f for f in files if anchor in safe_open(str(f), "pt").keys())
    other = next(f for f in files if f != holder)
    with safe_open(str(holder), "pt") as handle:
        duplicate = handle.get_tensor(anchor)
    rewrite = {}
    with safe_open(str(other), "pt") as handle:
        for name in handle.keys():
            rewrite[name] = handle.get_tensor(name)
    rewrite[anchor] = duplicate
    save_file(rewrite, str(other))
    with pytest.raises(CheckpointError, match=rf"tensor {anchor} is stored twice, in .* and .*; the shards do not belong together"):
        moee_ref.load_model(directory)


# ---------------------------------------------------------------------------
# Reading tensor data: pread into memory of the loader's own, never a mapping


def test_reader_returns_tensors_exactly_as_stored(tmp_path):
    """Every dtype and shape the reader handles itself gives what safetensors gives, in memory of its own."""
    generator = torch.Generator().manual_seed(0)
    stored = {
        "f32": torch.randn(3, 5, generator=generator),
        "bf16": torch.randn(7, 2, generator=generator).bfloat16(),
        "f16": torch.randn(4, generator=generator).half(),
        "f64": torch.randn(2, 2, 2, generator=generator).double(),
        "i64": torch.arange(-5, 6),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }
    file = tmp_path / "model.safetensors"
    save_file(stored, str(file))
    with checkpoint.ShardReader([file]).reading() as shards:
        read = {name: shards.read(name) for name in stored}
    for name, tensor in stored.items():
        assert read[name].dtype == tensor.dtype and read[name].shape == tensor.shape, name
        assert torch.equal(read[name], tensor), name
    read["f32"].add_(1)  # writable memory of its own: the file is untouched
    assert torch.equal(load_file(str(file))["f32"], stored["f32"])


def test_shard_cut_short_after_the_header_scan_is_named(tmp_path):
    """A shard truncated between checking and reading (e.g. a download still being written) is a CheckpointError."""
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(16), "b": torch.ones(1024)}, str(file))
    reader = checkpoint.ShardReader([file])
    with open(file, "r+b") as handle:
        handle.truncate(file.stat().st_size - 100)
    with reader.reading() as shards:
        assert torch.equal(shards.read("a"), torch.ones(16))
        with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read tensor b: the file ends early; it is truncated, re-download it"):
            shards.read("b")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_reading_maps_no_shard_into_memory(bf16_checkpoint):
    """Mapped shard pages would count in the resident memory on top of the converted weights."""
    reader = checkpoint.ShardReader(checkpoint.shard_files(bf16_checkpoint))
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    with reader.reading() as shards:
        tensor = shards.read(name)
        maps = Path("/proc/self/maps").read_text()
    assert tensor.dtype == torch.bfloat16 and reader.location[name].name not in maps


# ---------------------------------------------------------------------------
# Reading ahead in a background thread while the loader converts


def test_read_ahead_hands_over_tensors_in_order_and_errors_in_place():
    def read(name):
        if name == "bad":
            raise CheckpointError("bad is corrupt")
        return torch.full((2,), float(len(name)))

    with checkpoint.ReadAhead(read, ["a", "bb", "bad", "never"]) as ahead:
        assert torch.equal(ahead.read("a"), torch.full((2,), 1.0))
        assert torch.equal(ahead.read("bb"), torch.full((2,), 2.0))
        with pytest.raises(CheckpointError, match="bad is corrupt"):
            ahead.read("bad")
    assert not ahead.thread.is_alive()
    with checkpoint.ReadAhead(read, ["a", "bb"]) as ahead:
        with pytest.raises(AssertionError, match="read bb, expected a"):
            ahead.read("bb")


def test_read_ahead_stops_when_the_loader_stops_early():
    reads = []
    with checkpoint.ReadAhead(lambda name: reads.append(name) or torch.zeros(1), [str(i) for i in range(1000)], depth=2) as ahead:
        ahead.read("0")
    assert not ahead.thread.is_alive() and len(reads) < 1000


def test_shard_truncated_during_loading_is_a_checkpoint_error(bf16_checkpoint, tmp_path, monkeypatch):
    """The error of a read in the background thread reaches load_model's caller, and no reader thread is left."""
    directory = copy_of(bf16_checkpoint, tmp_path)
    real_read, victim = checkpoint._OpenShards.read, "model.layers.1.mlp.experts.2.up_proj.weight"

    def read(self, name):
        if name == victim:
            with open(self.reader.location[name], "r+b") as handle:
                handle.truncate(self.reader.spans[name][1] + 1)
        return real_read(self, name)

    monkeypatch.setattr(checkpoint._OpenShards, "read", read)
    before = threading.active_count()
    with pytest.raises(CheckpointError, match=rf"cannot read tensor {re.escape(victim)}: the file ends early"):
        moee_ref.load_model(directory)
    assert threading.active_count() == before
