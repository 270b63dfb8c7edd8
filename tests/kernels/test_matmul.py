"""The matmul every layer goes through: `matmul.linear`, oneDNN for float32 on the CPU (row tiles of a few
shapes, weights plain or packed), F.linear otherwise; and models loaded with packed weights."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moee_ref import MoEEmbedder, load_model
from moee_ref.kernels import onednn as matmul
from moee_ref.errors import CheckpointError
from moee_ref.decoder.layers import Linear
from moee_ref.decoder.moe import RoutedExperts
from moee_ref.kernels.experts import GroupedExperts, OneDNNExperts
from moee_ref.kernels import use_kernels
from moee_ref.kernels.onednn import OneDNNLinear
from moee_ref.kernels.onednn import EXACT_ROWS, ROW_STEP, ROW_TILE, linear, onednn_applies, pack_weight, packing_available, row_tiles
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint
import moee_ref.families

ONEDNN = matmul._ONEDNN_LINEAR is not None
FP32_REL = 1e-6  # float32 rounding of a 256-term dot product, relative to the output's largest value


@pytest.fixture
def onednn_rows(monkeypatch) -> list[int]:
    """The number of rows of every call that reaches oneDNN's linear, in order."""
    calls: list[int] = []
    real = matmul._ONEDNN_LINEAR
    monkeypatch.setattr(matmul, "_ONEDNN_LINEAR", lambda x, *rest: calls.append(x.shape[0]) or real(x, *rest))
    return calls


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("shape", [(1, 256), (5, 256), (3, 7, 256), (2, 3, 4, 256)], ids=["1row", "5rows", "3d", "4d"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float64(shape, bias):
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(*shape, generator=generator), torch.randn(96, 256, generator=generator)
    b = torch.randn(96, generator=generator) if bias else None
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    out = linear(x, weight, b)
    assert out.shape == (*shape[:-1], 96) and out.dtype == torch.float32
    assert rel_error(out, exact) <= FP32_REL


def test_linear_takes_views_and_empty_inputs():
    generator = torch.Generator().manual_seed(1)
    stacked = torch.randn(4, 96, 256, generator=generator)
    x = torch.randn(256, 9, generator=generator).t()  # not contiguous
    assert rel_error(linear(x, stacked[2]), F.linear(x.double(), stacked[2].double())) <= FP32_REL
    assert linear(torch.empty(0, 256), stacked[0]).shape == (0, 96)


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
def test_float32_without_gradients_goes_through_onednn(onednn_rows):
    calls = onednn_rows
    x, weight = torch.randn(3, 256), torch.randn(96, 256)
    linear(x, weight)
    assert len(calls) == 1
    # The other cases stay on F.linear: float64, and anything that needs a gradient (oneDNN's op has no autograd).
    linear(x.double(), weight.double())
    linear(x, weight.requires_grad_())
    linear(x, weight.detach(), torch.zeros(96, requires_grad=True))
    assert len(calls) == 1


def test_gradients_flow_where_asked():
    x = torch.randn(3, 256, requires_grad=True)
    weight = torch.randn(96, 256, requires_grad=True)
    linear(x, weight).sum().backward()
    assert torch.allclose(weight.grad, x.detach().sum(0).expand(96, -1)) and x.grad is not None
    assert not onednn_applies(x, weight)


def test_linear_module_has_no_random_init_and_uses_linear():
    module = OneDNNLinear(256, 96, bias=True)
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    module.requires_grad_(False)
    x = torch.randn(2, 256)
    assert torch.equal(module(x), linear(x, module.weight, module.bias))
    plain = Linear(256, 96, bias=True)  # the reference layer: F.linear
    plain.load_state_dict(module.state_dict())
    assert torch.equal(plain(x), F.linear(x, module.weight, module.bias))


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
def test_experts_run_one_call_per_active_expert_through_onednn(onednn_rows):
    """With oneDNN serving float32, the experts do not take grouped_mm (MKL underneath): one matmul pair per expert."""
    generator = torch.Generator().manual_seed(2)
    experts = OneDNNExperts(6, 32, 16).requires_grad_(False)
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(6, 32, 32, generator=generator))
        experts.down.copy_(torch.randn(6, 32, 16, generator=generator))
    x = torch.randn(10, 32, generator=generator)
    ids = torch.tensor([[0, 1]] * 5 + [[1, 3]] * 5)  # experts 0, 1, 3 active
    weights = torch.rand(10, 2, generator=generator)
    # The kernel the loader picks for float32 where oneDNN serves it: not grouped_mm.
    assert type(use_kernels(RoutedExperts(6, 32, 16), torch.float32)) is OneDNNExperts
    out = experts(x, ids, weights)
    assert len(onednn_rows) == 2 * 3
    expected = torch.zeros(10, 32, dtype=torch.float64)
    for token in range(10):
        for slot in range(2):
            e = int(ids[token, slot])
            gate, up = (x[token].double() @ experts.gate_up[e].double().T).chunk(2)
            expected[token] += weights[token, slot].double() * (experts.down[e].double() @ (F.silu(gate) * up))
    assert rel_error(out, expected) <= 1e-5


# ---------------------------------------------------------------------------
# Row tiles: a bounded set of shapes, whatever the number of rows


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
def test_any_number_of_rows_runs_in_few_shapes(onednn_rows):
    allowed = set(range(1, EXACT_ROWS)) | set(range(EXACT_ROWS, ROW_TILE, ROW_STEP)) | {ROW_TILE << i for i in range(8)}
    seen = set()
    weight = torch.randn(16, 32)
    for num_rows in range(1, 3000, 7):
        onednn_rows.clear()
        linear(torch.randn(num_rows, 32), weight)
        shapes = list(onednn_rows)
        assert set(shapes) <= allowed, num_rows
        assert sum(shapes) - num_rows in range(ROW_STEP), num_rows  # at most ROW_STEP - 1 padded rows
        assert len(shapes) <= (num_rows // ROW_TILE).bit_length() + 1
        seen |= set(shapes)
    assert len(seen) <= len(allowed) and len(allowed) == 15 + 14 + 8


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
def test_few_rows_run_unpadded(onednn_rows):
    weight = torch.randn(16, 32)
    for num_rows in (1, ROW_STEP + 1, EXACT_ROWS - 1, EXACT_ROWS + 1, ROW_TILE + ROW_STEP + 1):
        onednn_rows.clear()
        x = torch.randn(num_rows, 32)
        assert rel_error(linear(x, weight), x.double() @ weight.double().T) <= 1e-6
        rest = num_rows % ROW_TILE
        padded = rest if rest < EXACT_ROWS else -(-rest // ROW_STEP) * ROW_STEP
        assert onednn_rows[-1] == padded, num_rows


def test_row_tiles_are_powers_of_two_of_the_tile():
    assert row_tiles(0) == row_tiles(ROW_TILE - 1) == []
    assert row_tiles(ROW_TILE * 5 + 3) == [(0, ROW_TILE * 4), (ROW_TILE * 4, ROW_TILE * 5)]


@pytest.mark.parametrize("num_rows", [1, 7, 8, 9, 127, 128, 129, 300, 1000])
def test_padded_and_tiled_rows_give_each_row_its_own_result(num_rows):
    generator = torch.Generator().manual_seed(num_rows)
    x, weight, bias = torch.randn(num_rows, 64, generator=generator), torch.randn(40, 64, generator=generator), torch.randn(40, generator=generator)
    out = linear(x, weight, bias)
    assert out.shape == (num_rows, 40)
    assert rel_error(out, F.linear(x.double(), weight.double(), bias.double())) <= FP32_REL


# ---------------------------------------------------------------------------
# Packed weights


@pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("num_rows", [1, 5, 40, 200])
def test_packed_weight_gives_the_same_product(num_rows):
    generator = torch.Generator().manual_seed(3)
    x, weight, bias = torch.randn(2, num_rows, 256, generator=generator), torch.randn(96, 256, generator=generator), torch.randn(96, generator=generator)
    packed = pack_weight(weight)
    assert packed.is_mkldnn and packed.shape == weight.shape
    out = linear(x, packed, bias)
    assert out.shape == (2, num_rows, 96)
    assert rel_error(out, F.linear(x.double(), weight.double(), bias.double())) <= FP32_REL


# ---------------------------------------------------------------------------
# Models loaded with packed weights (the embedder's default on the CPU)

needs_packing = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")
FAMILIES = tuple(moee_ref.families.FAMILIES)  # every supported family


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    return {family: write_random_checkpoint(root / family, SMALL_CONFIGS[family], dtype="bfloat16", seed=5, max_shard_bytes=2**17)
            for family in FAMILIES}


@needs_packing
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_model_computes_what_the_plain_model_does(checkpoints, family):
    dense = load_model(checkpoints[family])
    packed = load_model(checkpoints[family], packed=True)
    assert packed.packed and not dense.packed
    experts = [block.mlp.experts for block in packed.layers if hasattr(block.mlp, "experts")]
    if family == "gpt_oss":  # biased, clamped experts: oneDNN per expert on stacked weights, not packed
        assert experts and all(type(e) is OneDNNExperts and not e.plain for e in experts)
    else:
        assert experts and all(isinstance(e.gate_up, torch.nn.ParameterList) and len(e.gate_up) == e.num_experts for e in experts)
        assert all(w.is_mkldnn for e in experts for w in [*e.gate_up, *e.down])
    assert packed.layers[0].attn.o_proj.weight.is_mkldnn and not packed.embed.weight.is_mkldnn
    # bf16 widens exactly to float32: the table stays as stored, the model computes in float32.
    assert packed.embed.weight.dtype == torch.bfloat16 and packed.dtype == dense.dtype == torch.float32
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, dense.args.vocab_size, (3, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in one row
    with torch.inference_mode():
        a, b = dense(ids, mask), packed(ids, mask)
    assert rel_error(b.hidden_states, a.hidden_states) <= 1e-5
    assert float((b.router_probs - a.router_probs).abs().max()) <= 1e-6
    assert torch.equal(b.routing.topk_ids, a.routing.topk_ids)


@needs_packing
def test_embedder_packs_by_default_where_it_applies(checkpoints):
    directory = checkpoints["olmoe"]
    assert MoEEmbedder.from_pretrained(directory, dtype=torch.float32).model.packed
    assert not MoEEmbedder.from_pretrained(directory, dtype=torch.float32, packed=False).model.packed
    assert not MoEEmbedder.from_pretrained(directory, dtype=torch.float32, int8=True).model.packed
    assert not MoEEmbedder.from_pretrained(directory, dtype=torch.float64).model.packed
    texts = ["A cat sleeps on the mat.", "Stocks fell sharply today.", "Rain."]
    plain, fast = (MoEEmbedder.from_pretrained(directory, dtype=torch.float32, packed=p).encode(texts, "moee-concat") for p in (False, True))
    assert float(np.abs(fast - plain).max() / np.abs(plain).max()) <= 1e-5


@needs_packing
@pytest.mark.parametrize(("options", "message"), [
    ({"int8": True}, "packed=True is for float32 weights; it does not combine with another dtype or with int8"),
    ({"dtype": torch.float64}, "packed=True is for float32 weights; it does not combine with another dtype or with int8"),
])
def test_packing_refuses_what_it_cannot_pack(checkpoints, options, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(checkpoints["olmoe"], packed=True, **options)


def test_packing_without_onednn_is_named(checkpoints, monkeypatch):
    monkeypatch.setattr(matmul, "_ONEDNN_PACK", None)
    with pytest.raises(CheckpointError, match=r"packed=True needs torch built with oneDNN \(torch.backends.mkldnn\); load with packed=False"):
        load_model(checkpoints["olmoe"], packed=True)
    assert not MoEEmbedder.from_pretrained(checkpoints["olmoe"], dtype=torch.float32).model.packed  # the default falls back to plain weights


@needs_packing
def test_streamed_mode_packs_each_layer_when_asked(checkpoints, tmp_path):
    directory = checkpoints["deepseek"]
    texts = ["A cat sleeps on the mat.", "Stocks fell sharply today."]
    resident = MoEEmbedder.from_pretrained(directory, dtype=torch.float32, packed=False).encode(texts, "moee-concat")
    assert not MoEEmbedder.from_pretrained(directory, dtype=torch.float32, memory_budget="2GB").model.packed  # not by default there
    streamed = MoEEmbedder.from_pretrained(directory, dtype=torch.float32, memory_budget="2GB", spill_dir=str(tmp_path), packed=True)
    assert streamed.model.packed and isinstance(streamed.model.build_layer(1).mlp.experts.gate_up, torch.nn.ParameterList)
    assert float(np.abs(streamed.encode(texts, "moee-concat") - resident).max() / np.abs(resident).max()) <= 1e-5


@needs_packing
def test_tied_head_of_a_packed_model_gives_the_logits(tmp_path):
    """A tied LM head reads the embedding table, which a packed model keeps in bf16: widened for the logits."""
    directory = write_random_checkpoint(tmp_path / "tied", {**SMALL_CONFIGS["olmoe"], "tie_word_embeddings": True}, dtype="bfloat16", seed=2)
    dense, packed = load_model(directory), load_model(directory, packed=True)
    ids = torch.randint(3, dense.args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = dense(ids, return_logits=True).logits, packed(ids, return_logits=True).logits
    assert b.dtype == torch.float32 and rel_error(b, a) <= 1e-5
