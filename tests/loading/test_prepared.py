"""The prepared int8 cache (loading/prepared.py): built once, read back exactly, refused and rebuilt when stale or damaged.

Every test keeps its cache in a temporary folder of its own (cache_dir=); the
suite's conftest points $MOEE_CACHE_DIR at another one for all other loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from embed_fixtures import TEXTS, single_thread  # noqa: F401  (fixture used by name)
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint
from moee_ref.embedding.embedder import MoEEmbedder
from moee_ref.kernels.int8 import KERNEL_ENV, Int8Linear, Int8RoutedExperts, integer_path, integer_reason
from moee_ref.loading import prepared
from moee_ref.loading.checkpoint import load_model
from moee_ref.cache_dir import CACHE_ENV, cache_root
from moee_ref.loading.prepared import MANIFEST, PreparedCache

IDS = torch.tensor([[3, 17, 99, 250, 4, 8, 41, 7]])


@pytest.fixture
def checkpoint(tmp_path):
    return write_random_checkpoint(tmp_path / "ckpt", SMALL_CONFIGS["qwen2_moe"], seed=21)


def run(model) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        out = model(IDS)
    return {"hs": out.hidden_states, "topk": out.topk_ids, "weights": out.topk_weights}


def assert_same(a: dict, b: dict) -> None:
    for key in a:
        assert torch.equal(a[key], b[key]), key


def cache_files(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("kernel", ["fbgemm", "avx2", "weight-only"])
def test_built_once_then_read(checkpoint, tmp_path, monkeypatch, kernel):
    """The first int8 load builds the cache (one safetensors file a layer and the manifest, nothing else left behind);
    the next reads it, bit for bit the same model; on the weight-only and avx2 paths its int8 matrices are views of
    the mapped file, not copies (fbgemm packs copies of its own)."""
    monkeypatch.setenv(KERNEL_ENV, kernel)
    path = integer_path(torch.float32)
    if kernel != "weight-only" and (path is None or path.kernel != kernel):
        pytest.skip(f"no {kernel} kernel on this CPU: {integer_reason(torch.float32)}")
    cache = tmp_path / "cache"
    first = load_model(checkpoint, int8=True, cache_dir=cache)
    folder = PreparedCache(cache, checkpoint, torch.float32, first.args.num_layers).path
    assert first.prepared == f"built at {folder}: no prepared cache yet"
    layers = first.args.num_layers
    assert cache_files(folder) == sorted([MANIFEST] + [f"layer-{i:03d}.safetensors" for i in range(layers)])
    second = load_model(checkpoint, int8=True, cache_dir=cache)
    assert second.prepared == f"read from {folder}"
    assert_same(run(first), run(second))
    assert_same(run(second), run(load_model(checkpoint, int8=True, prepared_cache=False)))
    if kernel != "fbgemm":
        values = second.layers[0].attn.q_proj.values
        size = (folder / "layer-000.safetensors").stat().st_size
        assert values.untyped_storage().nbytes() == size  # a view into the whole file's mapping
        assert second.layers[0].attn.q_proj.scale.untyped_storage().nbytes() < size  # small tensors are copies
    else:
        assert all(m.packed is not None for m in second.modules() if isinstance(m, (Int8Linear, Int8RoutedExperts)))


def test_files_are_safetensors_never_pickle(checkpoint, tmp_path):
    cache = tmp_path / "cache"
    model = load_model(checkpoint, int8=True, cache_dir=cache)
    folder = PreparedCache(cache, checkpoint, torch.float32, model.args.num_layers).path
    for file in folder.glob("layer-*.safetensors"):
        head = file.read_bytes()[:2]
        assert head[:1] != b"\x80"  # pickle's protocol marker
        with safe_open(str(file), framework="pt") as handle:  # safetensors' own reader takes it
            names = [n for n in handle.keys() if not n.startswith("__padding")]
            assert handle.metadata() == {"format": str(prepared.FORMAT)}
            assert {handle.get_tensor(n).dtype for n in names if n.endswith("values")} == {torch.int8}
            assert "attn.q_proj.values" in names and "mlp.experts.gate_up_values" in names
    assert not [p for p in folder.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["checkpoint"][0] == "ckpt" and manifest["checkpoint"][1].startswith("sha256-")
    assert (manifest["format"], manifest["dtype"], manifest["layers"]) == (prepared.FORMAT, "float32", model.args.num_layers)


def test_changed_checkpoint_is_stale_and_rebuilt(checkpoint, tmp_path):
    """Other weights in the same folder: another identity, so the cache is stale; rebuilt from the new weights."""
    cache = tmp_path / "cache"
    old = load_model(checkpoint, int8=True, cache_dir=cache)
    old_identity = json.loads((PreparedCache(cache, checkpoint, torch.float32, 1).path / MANIFEST).read_text())["checkpoint"]
    shutil.rmtree(checkpoint)  # the same folder, other weights
    write_random_checkpoint(checkpoint, SMALL_CONFIGS["qwen2_moe"], seed=22)
    new = load_model(checkpoint, int8=True, cache_dir=cache)
    assert re.fullmatch(r"built at .+: stale \(checkpoint is \['ckpt', 'sha256-[0-9a-f]{16}'\], this load needs \['ckpt', 'sha256-[0-9a-f]{16}'\]\)",
                        new.prepared), new.prepared
    assert str(old_identity) in new.prepared
    fresh = run(load_model(checkpoint, int8=True, prepared_cache=False))
    assert_same(run(new), fresh)
    assert not torch.equal(run(old)["hs"], fresh["hs"])
    assert load_model(checkpoint, int8=True, cache_dir=cache).prepared.startswith("read from ")


def test_other_version_or_dtype(checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    load_model(checkpoint, int8=True, cache_dir=cache)
    monkeypatch.setattr(prepared, "moee_version", lambda: "9.9.9")
    model = load_model(checkpoint, int8=True, cache_dir=cache)
    assert model.prepared.endswith(": stale (moee_ref is '0.1.0', this load needs '9.9.9')") or re.search(
        r": stale \(moee_ref is '[^']+', this load needs '9\.9\.9'\)$", model.prepared), model.prepared
    # bf16 compute has a cache of its own beside float32's
    bf16 = load_model(checkpoint, torch.bfloat16, int8=True, cache_dir=cache)
    assert bf16.prepared.endswith("int8-bfloat16: no prepared cache yet")


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "manifest", "missing file"])
def test_damaged_cache_is_detected_and_rebuilt(checkpoint, tmp_path, damage):
    """A layer file cut short, one byte changed (same size: the CRC-32 catches it), an unreadable manifest or a
    missing file: never used; the load rebuilds the cache and gives what a load without it gives."""
    cache = tmp_path / "cache"
    expected = run(load_model(checkpoint, int8=True, cache_dir=cache))
    folder = PreparedCache(cache, checkpoint, torch.float32, 1).path
    victim = folder / "layer-001.safetensors"
    if damage == "truncated":
        with open(victim, "r+b") as handle:
            handle.truncate(victim.stat().st_size - 100)
        why = rf"damaged \(layer-001\.safetensors has \d+ bytes, \d+ were written\)"
    elif damage == "flipped byte":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x40
        victim.write_bytes(bytes(data))
        why = r"damaged \(layer-001\.safetensors does not match its checksum\)"
    elif damage == "manifest":
        (folder / MANIFEST).write_text("{not json")
        why = r"damaged \(its manifest is unreadable: JSONDecodeError\)"
    else:
        victim.unlink()
        why = r"damaged \(layer-001\.safetensors is missing\)"
    model = load_model(checkpoint, int8=True, cache_dir=cache)
    assert re.fullmatch(rf"built at .+: {why}", model.prepared), model.prepared
    assert_same(run(model), expected)
    again = load_model(checkpoint, int8=True, cache_dir=cache)
    assert again.prepared == f"read from {folder}"
    assert_same(run(again), expected)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_unwritable_cache_does_not_fail_the_load(checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    model = load_model(checkpoint, int8=True, cache_dir=blocker / "cache")
    assert re.fullmatch(r"not written \(.+: Not a directory\)", model.prepared), model.prepared
    assert_same(run(model), run(load_model(checkpoint, int8=True, prepared_cache=False)))


def test_off_and_float_loads(checkpoint, tmp_path):
    cache = tmp_path / "cache"
    assert load_model(checkpoint, int8=True, cache_dir=cache, prepared_cache=False).prepared == "not used (prepared_cache=False)"
    assert not cache.exists()
    model = load_model(checkpoint, cache_dir=cache)  # float loads have nothing to prepare
    assert model.prepared is None and model.int8_kernel is None and not cache.exists()


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "moee-ref"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "moee-ref"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "option") == tmp_path / "option"


def test_from_pretrained_reports_the_cache(checkpoint, tmp_path):
    cache = tmp_path / "cache"
    first = MoEEmbedder.from_pretrained(checkpoint, dtype="float32", int8=True, cache_dir=cache)
    vectors = first.encode(TEXTS, "moee-concat")
    assert first.last_report.prepared.startswith("built at ") and first.last_report.int8_kernel == first.model.int8_kernel
    second = MoEEmbedder.from_pretrained(checkpoint, dtype="float32", int8=True, cache_dir=cache)
    np.testing.assert_array_equal(second.encode(TEXTS, "moee-concat"), vectors)
    assert second.last_report.prepared.startswith("read from ")
    plain = MoEEmbedder.from_pretrained(checkpoint, dtype="float32")
    plain.encode(TEXTS[:2], "hs")
    assert plain.last_report.prepared is None and plain.last_report.int8_kernel is None


def moee(*argv, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moee_ref.cli.main", *map(str, argv)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_cli_info_and_embed_say_whether_the_cache_is_used(checkpoint, tmp_path):
    cache = tmp_path / "cache"
    info = moee("info", "--model", checkpoint, "--cache-dir", cache, "--json")
    assert info.returncode == 0, info.stderr
    facts = json.loads(info.stdout)["int8"]
    assert facts["cache_usable"] is False and facts["cache_state"] == "an int8 load builds it (no prepared cache yet)"
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out.npy"
    embed = moee("embed", "--model", checkpoint, "--input", texts, "--output", out, "--int8", "--dtype", "float32", "--cache-dir", cache)
    assert embed.returncode == 0, embed.stderr
    assert re.fullmatch(r"int8: .+; prepared cache built at .+: no prepared cache yet", embed.stderr.splitlines()[-1]), embed.stderr
    text = moee("info", "--model", checkpoint, "--cache-dir", cache)
    lines = [line for line in text.stdout.splitlines() if line.startswith("int8 ")]
    auto = json.loads(info.stdout)["compute"]["auto_dtype"]
    if auto == "float32":  # info describes the auto dtype's cache; the embed above computed in float32
        assert lines[1].endswith(": present, an int8 load reads it"), lines
    assert lines[0].startswith("int8 matmuls        ") and lines[1].startswith(f"int8 prepared cache {cache}")
    again = moee("embed", "--model", checkpoint, "--input", texts, "--output", out, "--int8", "--dtype", "float32", "--no-prepared-cache",
                 "--cache-dir", cache)
    assert again.returncode == 0 and again.stderr.splitlines()[-1].endswith("; prepared cache not used (prepared_cache=False)"), again.stderr
