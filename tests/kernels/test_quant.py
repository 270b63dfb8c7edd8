"""Weight-only int8 (kernels/int8.py) and loading without the LM head, on small random checkpoints.

Exact claims are checked exactly: int8 layers compute F.linear with their
dequantized weights, bit for bit, and int8 streaming equals int8 resident
within the streamed mode's max relative error of 1e-5. Quantization error
is bounded per row by half a scale step (up to float32 rounding of w/scale).
How close int8 embeddings stay to float ones is an observation on random
weights, asserted with a margin (figures in test_int8_embeddings_close_to_float).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from embed_fixtures import TEXTS, max_rel_error, single_thread, tensor_reads  # noqa: F401  (fixtures used by name)
from moee_ref.kernels import onednn
from moee_ref.loading.checkpoint import load_model
from moee_ref.embedding.embedder import MoEEmbedder
from moee_ref.errors import InputError
from moee_ref.decoder.layers import Linear, RMSNorm, SwiGLU
from moee_ref.decoder.moe import RoutedExperts
from moee_ref.decoder.moe import MoE
from moee_ref.kernels.experts import OneDNNExperts
from moee_ref.kernels.int8 import Int8Linear, Int8RoutedExperts, integer_path, quantize_rows
from moee_ref.loading.streamed import StreamedModel
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint
from moee_ref.loading.tokenizer import Tokenizer
import moee_ref.families

FAMILIES = tuple(moee_ref.families.FAMILIES)  # every supported family
# float32 rounding of w / scale moves a quotient of at most 127 by at most 127 * 2**-24 (one half ulp): the
# per-row error bound scale / 2 holds up to that much of a scale step.
ROUNDING = 127 * 2**-23


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-ckpt")
    return {family: write_random_checkpoint(root / family, SMALL_CONFIGS[family], seed=40 + i) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def float_models(checkpoints):
    return {family: load_model(checkpoints[family]) for family in FAMILIES}


@pytest.fixture(scope="module")
def int8_models(checkpoints):
    return {family: load_model(checkpoints[family], int8=True) for family in FAMILIES}


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, and one a weight for int8 matrices on the integer path (whose values then live
    only in fbgemm's packed copy)."""
    packed = 0
    for module in model.modules():
        if isinstance(module, Int8Linear) and module.packed is not None:
            packed += int(np.prod(module.shape))
        elif isinstance(module, Int8RoutedExperts) and module.packed is not None:
            packed += sum(int(np.prod(shape)) for shape in module.shapes)
    return packed + sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# ---------------------------------------------------------------------------
# quantize_rows


def test_quantize_rows_bounds_and_scales():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 40, generator=generator) * torch.logspace(-4, 2, 7)[:, None]  # rows of very different size
    weight[3] = 0.0
    values, scale = quantize_rows(weight)
    assert values.dtype == torch.int8 and values.shape == weight.shape
    assert scale.dtype == torch.float32 and scale.shape == (7,)

    nonzero = [i for i in range(7) if i != 3]
    assert torch.equal(scale[nonzero], weight[nonzero].abs().amax(-1) / 127)
    # The all-zero row stays exactly zero.
    assert not values[3].any() and not (values[3].float() * scale[3]).any()
    # Per row, the reconstruction is off by at most half a step.
    error = (weight.double() - values.double() * scale.double()[:, None]).abs().amax(-1)
    assert bool((error <= scale.double() * (0.5 + ROUNDING)).all()), (error / scale.double()).tolist()
    # Symmetric: the largest |w| of each row is +-127 exactly, -128 is never used, and -w gives -values.
    assert int(values.min()) >= -127 and int(values.max()) <= 127
    assert torch.equal(values[nonzero].abs().amax(-1), torch.full((6,), 127, dtype=torch.int8))
    negated, negated_scale = quantize_rows(-weight)
    assert torch.equal(negated, -values) and torch.equal(negated_scale, scale)


def test_quantize_rows_examples():
    values, scale = quantize_rows(torch.tensor([[-2.0, 1.1, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.25, -0.25, 0.1, 0.0]]))
    # 1.1 * 127 / 2 = 69.85, 0.5 * 127 / 2 = 31.75, 0.1 * 127 / 0.25 = 50.8: rounded to nearest
    assert values.tolist() == [[-127, 70, 32, 0], [0, 0, 0, 0], [127, -127, 51, 0]]
    assert scale[0].item() == pytest.approx(2 / 127, rel=1e-7) and scale[2].item() == pytest.approx(0.25 / 127, rel=1e-7)


def test_quantize_rows_stacked_and_bf16():
    """Stacked experts [E, rows, cols] get one scale per row of each expert; bf16 weights give float32 scales."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 5, 16, generator=generator).to(torch.bfloat16)
    values, scale = quantize_rows(weight)
    assert values.shape == (3, 5, 16) and scale.shape == (3, 5) and scale.dtype == torch.float32
    for e in range(3):
        v, s = quantize_rows(weight[e])
        assert torch.equal(values[e], v) and torch.equal(scale[e], s)
    error = (weight.double() - values.double() * scale.double()[..., None]).abs().amax(-1)
    assert bool((error <= scale.double() * (0.5 + ROUNDING)).all())


# ---------------------------------------------------------------------------
# Int8 modules compute with their dequantized weights exactly


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_equals_dequantized_linear(bias, monkeypatch):
    from moee_ref.kernels import int8

    monkeypatch.setattr(int8, "int8_kernel_rows", lambda dtype: 0)  # the weight converted: float32's rounding (the kernel's below)
    torch.manual_seed(2)
    linear = nn.Linear(40, 24, bias=bias)
    with torch.no_grad():
        if bias:
            linear.bias.normal_()
    q = Int8Linear(linear)
    assert {name for name, _ in q.named_buffers()} == {"values", "scale"}
    assert [name for name, _ in q.named_parameters()] == (["bias"] if bias else [])
    assert q.values.dtype == torch.int8 and q.scale.dtype == torch.float32
    x = torch.randn(2, 5, 40)
    dequantized = q.values.float() * q.scale[:, None]
    # The scales multiply the product, not the weight: the same value up to float32 reassociation.
    torch.testing.assert_close(q(x), onednn.linear(x, dequantized, linear.bias), rtol=1e-5, atol=1e-6)
    if bias:
        assert q.bias is linear.bias  # the bias is kept as it is
    # And close to the float layer: |error| <= sum_j |x_j| * step_j / 2, bounded by the largest half step.
    bound = x.abs().sum(-1, keepdim=True) * q.scale.max() * (0.5 + ROUNDING)
    assert bool(((q(x) - linear(x)).abs() <= bound + 1e-5).all())


def test_int8_routed_experts_equal_dequantized_experts(monkeypatch):
    from moee_ref.kernels import int8

    generator = torch.Generator().manual_seed(3)
    experts = RoutedExperts(6, 16, 8)
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(6, 16, 16, generator=generator) / 4)
        experts.down.copy_(torch.randn(6, 16, 8, generator=generator) / 3)
    q = Int8RoutedExperts(experts)
    assert q.num_experts == 6 and not list(q.parameters())
    assert q.gate_up_values.dtype == q.down_values.dtype == torch.int8

    reference = OneDNNExperts(6, 16, 8).requires_grad_(False)  # like a loaded float32 model: the same matmul path as q
    with torch.no_grad():
        reference.gate_up.copy_(q.gate_up_values.float() * q.gate_up_scale[..., None])
        reference.down.copy_(q.down_values.float() * q.down_scale[..., None])
    x = torch.randn(10, 16, generator=generator)
    ids = torch.randint(0, 6, (10, 2), generator=generator)
    ids[:, 1] = (ids[:, 0] + 1) % 6  # two different experts per token
    weights = torch.rand(10, 2, generator=generator)
    expected = reference(x, ids, weights)
    # Few rows an expert: torch's int8 kernel, on rows rounded to bf16 (kernels/int8.py), so bf16's rounding.
    close = q(x, ids, weights)
    assert float((close - expected).abs().max() / expected.abs().max()) <= 2e-2
    # Without the kernel every matmul converts the weight: the dequantized experts up to float32 reassociation.
    monkeypatch.setattr(int8, "int8_kernel_rows", lambda dtype: 0)
    torch.testing.assert_close(q(x, ids, weights), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int8_kernel_reads_int8_for_few_rows(rows, monkeypatch):
    """At most int8_kernel_rows() rows of bf16 or float32 go to torch's int8 kernel (float32 rounded to bf16 for it,
    the result widened back); more rows, or float64, convert the weight. All agree with the dequantized matmul
    to bf16 rounding, and without the kernel float32 agrees with it to float32's."""
    from moee_ref.kernels import int8

    calls = []
    kernel = int8._INT8_MM
    if kernel is None:
        pytest.skip("this torch has no _weight_int8pack_mm")
    monkeypatch.setattr(int8, "_INT8_MM", lambda *a: calls.append(a[0].shape) or kernel(*a))
    monkeypatch.setattr(int8, "int8_kernel_rows", lambda dtype: 16 if dtype in int8.INT8_KERNEL_ROWS else 0)
    generator = torch.Generator().manual_seed(5)
    values, scale = quantize_rows(torch.randn(48, 64, generator=generator))
    x = torch.randn(rows, 64, generator=generator).bfloat16()
    out = int8.int8_linear(x, values, scale)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 48)
    assert calls == ([(rows, 64)] if rows <= 16 else [])
    reference = x.float() @ (values.float() * scale[:, None]).T
    assert float((out.float() - reference).abs().max() / reference.abs().max()) <= 2e-2
    wide = int8.int8_linear(x.float(), values, scale)
    assert wide.dtype == torch.float32 and wide.shape == (rows, 48)
    assert calls == ([(rows, 64)] * 2 if rows <= 16 else [])  # float32 takes the kernel for as many rows
    assert float((wide - reference).abs().max() / reference.abs().max()) <= 2e-2
    if rows > 16:
        torch.testing.assert_close(wide, reference, rtol=1e-5, atol=1e-5)
    int8.int8_linear(x.double(), values, scale)
    assert len(calls) == (2 if rows <= 16 else 0)  # float64 never does


# ---------------------------------------------------------------------------
# load_model(int8=True)


QUANTIZED_PARAMETERS = re.compile(
    r"layers\.\d+\.(attn\.([qkvo]|q_[ab]|kv_[ab])_proj\.weight|mlp\.experts\.(gate_up|down)|mlp\.shared\.(gate|up|down)\.weight|mlp\.(gate|up|down)\.weight)$"
)


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_modules(float_models, int8_models, family):
    model, reference = int8_models[family], float_models[family]
    assert model.int8 is True
    for layer, block in enumerate(model.layers):
        projections = [n for n in type(block.attn).projections if getattr(block.attn, n) is not None]
        assert len(projections) == (5 if family == "deepseek_v2" else 4)  # MLA with a query latent: q_a, q_b, kv_a, kv_b, o
        for name in projections:
            assert isinstance(getattr(block.attn, name), Int8Linear), (layer, name)
        norms = ("q_a_norm", "kv_a_norm") if family == "deepseek_v2" else ("q_norm", "k_norm")
        for norm in (block.attn_norm, block.mlp_norm, *(getattr(block.attn, n) for n in norms)):
            assert norm is None or (isinstance(norm, RMSNorm) and norm.weight.dtype == torch.float32)
        if isinstance(block.mlp, MoE):
            assert isinstance(block.mlp.experts, Int8RoutedExperts)
            assert isinstance(block.mlp.router.weight, nn.Parameter) and block.mlp.router.weight.dtype == torch.float32
            assert torch.equal(block.mlp.router.weight, reference.layers[layer].mlp.router.weight)  # routers untouched
            if block.mlp.shared is not None:
                assert all(isinstance(getattr(block.mlp.shared, n), Int8Linear) for n in ("gate", "up", "down"))
            if block.mlp.shared_gate is not None:  # Qwen's per-token gate of the shared expert: a router, kept
                assert type(block.mlp.shared_gate) in (Linear, onednn.OneDNNLinear) and block.mlp.shared_gate.weight.dtype == torch.float32
        else:
            assert isinstance(block.mlp, SwiGLU)  # DeepSeek's dense first layer
            assert all(isinstance(getattr(block.mlp, n), Int8Linear) for n in ("gate", "up", "down"))
    assert any(getattr(block.attn.q_proj, "bias", None) is not None for block in model.layers) == (family in ("qwen2_moe", "gpt_oss"))
    assert type(model.embed) is nn.Embedding and torch.equal(model.embed.weight, reference.embed.weight)
    assert torch.equal(model.norm.weight, reference.norm.weight)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, reference.lm_head.weight)

    # Every parameter of the float model is either quantized (and then gone) or kept bit for bit.
    kept = dict(model.named_parameters())
    for name, parameter in reference.named_parameters():
        if QUANTIZED_PARAMETERS.search(name):
            assert name not in kept, name
        else:
            assert torch.equal(kept.pop(name), parameter), name
    assert not kept
    assert all(b.dtype == torch.int8 for n, b in model.named_buffers() if n.endswith("values"))
    # On fbgemm's integer path (where this CPU runs it) the values are in its packed copies, the scales stay.
    path = integer_path(torch.float32)
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int8RoutedExperts)):
            assert (module.packed is not None) == (path is not None and path.kernel == "fbgemm") and module.path == path
    # Bytes: 1 per quantized weight plus a float32 scale per row; everything else as before.
    expected = sum(
        p.numel() + 4 * (p.numel() // p.shape[-1]) if QUANTIZED_PARAMETERS.search(n) else p.numel() * 4
        for n, p in reference.named_parameters()
    )
    assert model_bytes(model) == expected


def test_int8_model_bytes(tmp_path):
    """Where the matrices dominate (more and wider layers than the vocabulary's rows), int8 holds < 0.4 x float32."""
    config = {**SMALL_CONFIGS["olmoe"], "hidden_size": 128, "num_hidden_layers": 6}
    directory = write_random_checkpoint(tmp_path / "wide", config, seed=4)
    float_bytes, int8_bytes = model_bytes(load_model(directory)), model_bytes(load_model(directory, int8=True))
    # Observed: 0.326 (0.355 to 0.371 for the default small configs, hidden 64 and 4 layers).
    assert int8_bytes < 0.4 * float_bytes, int8_bytes / float_bytes
    # Without the head (as embeddings load) the share of the embedding matrix shrinks further.
    float_bytes, int8_bytes = (model_bytes(load_model(directory, int8=q, lm_head=False)) for q in (False, True))
    assert int8_bytes < 0.35 * float_bytes, int8_bytes / float_bytes  # observed 0.300


def test_int8_embeddings_close_to_float(checkpoints, float_models, int8_models):
    """Observed on these checkpoints (min over TEXTS; share of changed top-k choices over all tokens and MoE layers):
    olmoe     HS cos 0.99974, RW cos 0.99971, top-k changed 14 of 2480 choices (0.56 %)
    qwen2_moe HS cos 0.99970, RW cos 0.99940, top-k changed 14 of 2480 choices (0.56 %)
    deepseek  HS cos 0.99981, RW cos 0.99949, top-k changed 15 of 1467 choices (1.02 %)
    Asserted with margin: cosine >= 0.99 for every text, top-k changes <= 5 %.
    """
    for family in FAMILIES:
        full = MoEEmbedder(float_models[family], Tokenizer.from_dir(checkpoints[family]))
        int8 = MoEEmbedder(int8_models[family], full.tokenizer)
        for kind in ("hs", "rw"):
            a, b = full.encode(TEXTS, kind), int8.encode(TEXTS, kind)
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            assert cos.min() >= 0.99, (family, kind, cos.min())
            assert cos.min() < 1.0  # int8 really changed something
        changed = total = 0
        for text in TEXTS:
            ids = torch.tensor([full.tokenizer.encode(text)])
            with torch.inference_mode():
                ours, ref = int8_models[family](ids).topk_ids, float_models[family](ids).topk_ids
            kept = (ours[..., :, None] == ref[..., None, :]).any(-1)  # each int8 choice: among the float choices?
            changed += int((~kept).sum())
            total += kept.numel()
        assert changed / total <= 0.05, (family, changed / total)


def test_from_pretrained_int8_has_no_head(checkpoints, int8_models):
    embedder = MoEEmbedder.from_pretrained(checkpoints["qwen2_moe"], dtype=torch.float32, int8=True)
    assert embedder.model.int8 is True and embedder.model.lm_head is None
    np.testing.assert_array_equal(
        embedder.encode(TEXTS, "moee-concat"),
        MoEEmbedder(int8_models["qwen2_moe"], embedder.tokenizer).encode(TEXTS, "moee-concat"),
    )


# ---------------------------------------------------------------------------
# lm_head=False


def test_load_without_lm_head(checkpoints, float_models, tensor_reads):
    reads = tensor_reads
    directory = checkpoints["deepseek"]
    headless = load_model(directory, lm_head=False)
    assert reads["lm_head.weight"] == 0 and reads["model.embed_tokens.weight"] == 1  # the head is never read
    assert headless.lm_head is None and headless.with_lm_head is False
    assert not [n for n in headless.state_dict() if n.startswith("lm_head")]
    full = float_models["deepseek"]
    assert model_bytes(full) - model_bytes(headless) == full.lm_head.weight.numel() * 4

    ids = torch.tensor([[3, 17, 99, 250, 4, 8]])
    with torch.inference_mode():
        out, ref = headless(ids), full(ids, return_logits=True)
        with pytest.raises(
            InputError,
            match=r"^this model was loaded without its LM head \(for embeddings\); load it with lm_head=True for logits$",
        ):
            headless(ids, return_logits=True)
    assert torch.equal(out.hidden_states, ref.hidden_states)
    for field in ("router_logits", "router_probs", "topk_ids", "topk_weights"):
        assert torch.equal(getattr(out, field), getattr(ref, field)), field
    assert out.logits is None and ref.logits.shape == (1, 6, SMALL_CONFIGS["deepseek"]["vocab_size"])
    torch.testing.assert_close(ref.logits, ref.hidden_states @ full.lm_head.weight.T, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# int8 streaming


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_streamed_equals_int8_resident(checkpoints, int8_models, family, tmp_path):
    directory = checkpoints[family]
    resident = MoEEmbedder(int8_models[family], Tokenizer.from_dir(directory))
    probe = StreamedModel(directory, memory_budget="8GB", int8=True)
    lengths = sorted((len(s) for s in resident.tokenizer.tokenize(TEXTS)[0]), reverse=True)
    shapes = [(len(lengths[i : i + 3]), lengths[i]) for i in range(0, len(lengths), 3)]
    smallest = probe.memory_plan(shapes)["smallest"]
    for budget, spills in ((smallest, True), ("8GB", False)):
        streamed = MoEEmbedder.from_pretrained(directory, dtype=torch.float32, int8=True, memory_budget=budget, spill_dir=str(tmp_path))
        for kind in ("hs", "rw"):
            ours = streamed.encode(TEXTS, kind, batch_size=3)
            assert streamed.model.stats.spilled is spills
            assert max_rel_error(ours, resident.encode(TEXTS, kind, batch_size=3)) <= 1e-5, (budget, kind)
    # The int8 plan holds less for weights than the float one.
    assert probe.memory_plan(shapes)["weights"] < StreamedModel(directory, memory_budget="8GB").memory_plan(shapes)["weights"]


# ---------------------------------------------------------------------------
# The integer paths: int8 x int8 through fbgemm, int8 x int16 through int8_avx2.c (kernels/int8.py `integer_path`)

from moee_ref.kernels import int8 as int8_kernels  # noqa: E402
from moee_ref.kernels import int8_avx2  # noqa: E402

HAS_FBGEMM = int8_kernels._QLINEAR is not None and "fbgemm" in torch.backends.quantized.supported_engines
needs_fbgemm = pytest.mark.skipif(not HAS_FBGEMM, reason="this torch has no fbgemm int8 kernels")


def exact_path() -> int8_kernels.IntegerPath:
    bits = next((b for b in (8, 7) if int8_kernels._exact(b)), None)
    if bits is None:
        pytest.skip("fbgemm's int8 products are not exact on this CPU: the integer path is never chosen here")
    return int8_kernels.IntegerPath(bits, "")


@needs_fbgemm
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_error_bound(rows, bias):
    """Against x @ dequantized W.T in float64, each output is off by at most sum_j |W[n, j]| times an activation's
    largest error, peak / (4 top^2) (half a step of the residual's levels), plus float32 rounding (1e-5 relative);
    an all-zero row gives exactly zero (or the bias)."""
    path = exact_path()
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(48, 96, generator=generator) * torch.logspace(-2, 1, 48)[:, None]
    x = torch.randn(rows, 96, generator=generator) * torch.logspace(-3, 2, rows)[:, None]  # rows of very different size
    x[0] = 0.0
    b = torch.randn(48, generator=generator) if bias else None
    values, scale = quantize_rows(weight)
    out = int8_kernels.packed_linear(x, int8_kernels.pack_int8(values, scale), path, b)
    assert out.dtype == torch.float32 and out.shape == (rows, 48)
    dequantized = values.double() * scale.double()[:, None]
    reference = x.double() @ dequantized.T + (b.double() if bias else 0)
    peak = x.double().abs().amax(-1, keepdim=True)
    bound = dequantized.abs().sum(-1)[None, :] * peak / (4 * path.top**2) + 1e-5 * (x.double().abs() @ dequantized.abs().T) + 1e-6
    assert bool(((out.double() - reference).abs() <= bound).all()), float(((out.double() - reference).abs() / bound).max())
    assert torch.equal(out[0], b if bias else torch.zeros(48))
    # bf16 rows come back bf16: the float32 result of the same (widened) rows, rounded
    narrow = int8_kernels.packed_linear(x.bfloat16(), int8_kernels.pack_int8(values, scale), path)
    assert narrow.dtype == torch.bfloat16
    widened = int8_kernels.packed_linear(x.bfloat16().float(), int8_kernels.pack_int8(values, scale), path)
    assert torch.equal(narrow, widened.bfloat16())


@needs_fbgemm
def test_packing_copies_the_values():
    """fbgemm's packed weight is a copy: what happens to the int8 values afterwards does not change its results,
    which is what lets Int8Linear.pack_ drop them."""
    path = exact_path()
    values, scale = quantize_rows(torch.randn(32, 64, generator=torch.Generator().manual_seed(12)))
    packed = int8_kernels.pack_int8(values, scale)
    x = torch.randn(3, 64)
    before = int8_kernels.packed_linear(x, packed, path)
    values.zero_()
    assert torch.equal(int8_kernels.packed_linear(x, packed, path), before)


def test_kernel_choice_env(monkeypatch):
    monkeypatch.setenv(int8_kernels.KERNEL_ENV, "weight-only")
    assert int8_kernels.integer_path(torch.float32) is None
    assert int8_kernels.integer_reason(torch.float32) == "weight-only int8 (MOEE_INT8_KERNEL=weight-only)"
    monkeypatch.setenv(int8_kernels.KERNEL_ENV, "fast")
    assert int8_kernels.integer_path(torch.float32) is None
    assert int8_kernels.integer_reason(torch.float32) == (
        "MOEE_INT8_KERNEL='fast' is not one of auto, integer, fbgemm, avx2, weight-only: the weight-only path")
    monkeypatch.setenv(int8_kernels.KERNEL_ENV, "integer")
    assert int8_kernels.integer_path(torch.float16) is None  # float16 and float64 rows always take the weight-only path
    # "integer": fbgemm where its 8-bit products are exact (VNNI), else the AVX2 kernel, else fbgemm's 7-bit levels
    path = int8_kernels.integer_path(torch.float32)
    if HAS_FBGEMM and int8_kernels._exact(8):
        assert path.reason == "int8 x int8 through fbgemm, activations in two 8-bit levels (MOEE_INT8_KERNEL=integer)"
    elif int8_avx2.library()[0] is not None:
        assert path.reason == ("int8 x int16 through AVX2 dot products (int8_avx2.c), activations in int16 per row"
                               " (MOEE_INT8_KERNEL=integer)") and path.kernel == "avx2"
    for kernel, available in (("fbgemm", HAS_FBGEMM and any(int8_kernels._exact(b) for b in (8, 7))),
                              ("avx2", int8_avx2.library()[0] is not None)):
        monkeypatch.setenv(int8_kernels.KERNEL_ENV, kernel)
        path = int8_kernels.integer_path(torch.float32)
        assert (path is not None and path.kernel == kernel) if available else path is None, (kernel, path)


INTEGER_KERNELS = {
    "fbgemm": HAS_FBGEMM and any(int8_kernels._exact(b) for b in (8, 7)),
    "avx2": int8_avx2.library()[0] is not None,
}


@pytest.fixture(scope="module")
def kernel_models(checkpoints, tmp_path_factory):
    """Every family loaded in int8 on each integer kernel this CPU has and on the weight-only path (the env override)."""
    models = {}
    with pytest.MonkeyPatch.context() as patch:
        for kernel in [k for k, available in INTEGER_KERNELS.items() if available] + ["weight-only"]:
            patch.setenv(int8_kernels.KERNEL_ENV, kernel)
            models[kernel] = {family: load_model(checkpoints[family], int8=True, prepared_cache=False) for family in FAMILIES}
    return models


def needs_integer_kernel(kernel: str) -> None:
    if not INTEGER_KERNELS[kernel]:
        pytest.skip(f"no {kernel} integer kernel on this CPU: {int8_kernels._integer_decision(torch.float32, kernel)[1]}")


@pytest.mark.parametrize("kernel", INTEGER_KERNELS)
@pytest.mark.parametrize("family", FAMILIES)
def test_integer_path_parity(checkpoints, float_models, kernel_models, family, kernel):
    """Every int8 matrix of every family on each integer path, and its vectors as close to float32 as the weight-only
    path's. Observed for fbgemm (min over TEXTS of the cosine to float32, integer / weight-only):
    olmoe HS 0.99974 / 0.99973, RW 0.99971 / 0.99970; qwen2_moe 0.99970 / 0.99970, 0.99940 / 0.99937;
    deepseek 0.99981 / 0.99980, 0.99949 / 0.99948; qwen3_moe 0.99968 / 0.99966, 0.99847 / 0.99835;
    mixtral 0.99981 / 0.99982, 0.99996 / 0.99996; deepseek_v2 0.99869 / 0.99872, 0.99917 / 0.99917;
    gpt_oss 0.99947 / 0.99946, 0.99989 / 0.99989. (With one level of activation int8 instead of two, mixtral's HS
    fell to 0.963.) Asserted: cosine >= 0.995 for every text, at most 0.0005 below the weight-only path's, and the
    two paths' vectors within cosine 0.999 of each other. avx2 (AMD EPYC Zen 4 under ATEN_CPU_CAPABILITY=avx2):
    olmoe 0.99975 / 0.99971, qwen2_moe 0.99970 / 0.99940, deepseek 0.99981 / 0.99949, qwen3_moe 0.99968 / 0.99847,
    mixtral 0.99981 / 0.99996, deepseek_v2 0.99868 / 0.99917, gpt_oss 0.99947 / 0.99989 (HS / RW)."""
    needs_integer_kernel(kernel)
    model, weight_only = kernel_models[kernel][family], kernel_models["weight-only"][family]
    prefix = {"fbgemm": "int8 x int8 through fbgemm", "avx2": "int8 x int16 through AVX2 dot products"}[kernel]
    assert model.int8_kernel.startswith(prefix) and weight_only.int8_kernel == "weight-only int8 (MOEE_INT8_KERNEL=weight-only)"
    quantized = [m for m in model.modules() if isinstance(m, (Int8Linear, Int8RoutedExperts))]
    assert quantized and all(m.path is not None and m.path.kernel == kernel for m in quantized)
    assert all((m.packed is not None) == (kernel == "fbgemm") for m in quantized)
    assert all(m.packed is None for m in weight_only.modules() if isinstance(m, (Int8Linear, Int8RoutedExperts)))
    tokenizer = Tokenizer.from_dir(checkpoints[family])
    full, ours, theirs = (MoEEmbedder(m, tokenizer) for m in (float_models[family], model, weight_only))
    for kind in ("hs", "rw"):
        a, b, c = full.encode(TEXTS, kind), ours.encode(TEXTS, kind), theirs.encode(TEXTS, kind)
        cos = lambda u, v: (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))  # noqa: E731
        assert cos(a, b).min() >= 0.995, (kind, cos(a, b).min())
        assert cos(a, b).min() >= cos(a, c).min() - 5e-4, (kind, cos(a, b).min(), cos(a, c).min())
        assert cos(b, c).min() >= 0.999, (kind, cos(b, c).min())
        assert ours.last_report.int8_kernel == model.int8_kernel


@pytest.mark.parametrize("kernel", INTEGER_KERNELS)
def test_integer_path_streamed_equals_resident(checkpoints, kernel_models, monkeypatch, kernel):
    """Layer-streamed int8 puts each layer on the integer path as it builds it: the same matmuls as resident, to 1e-5."""
    needs_integer_kernel(kernel)
    monkeypatch.setenv(int8_kernels.KERNEL_ENV, kernel)
    directory = checkpoints["qwen2_moe"]
    resident = MoEEmbedder(kernel_models[kernel]["qwen2_moe"], Tokenizer.from_dir(directory))
    streamed = MoEEmbedder.from_pretrained(directory, dtype=torch.float32, int8=True, memory_budget="8GB")
    assert streamed.model.int8_kernel == resident.model.int8_kernel
    for kind in ("hs", "rw"):
        assert max_rel_error(streamed.encode(TEXTS, kind, batch_size=3), resident.encode(TEXTS, kind, batch_size=3)) <= 1e-5, kind


def test_weight_only_kernel_skips_unaligned_widths(monkeypatch):
    """torch's weight-only kernel read out of bounds (a segmentation fault on an AVX-512 CPU) for 5 rows of width 8:
    widths that are not a multiple of 16 convert the weight instead."""
    from moee_ref.kernels import int8

    calls = []
    kernel = int8._INT8_MM
    if kernel is None:
        pytest.skip("this torch has no _weight_int8pack_mm")
    monkeypatch.setattr(int8, "_INT8_MM", lambda *a: calls.append(a[0].shape) or kernel(*a))
    values, scale = quantize_rows(torch.randn(16, 8, generator=torch.Generator().manual_seed(13)))
    x = torch.randn(5, 8)
    torch.testing.assert_close(int8.int8_linear(x, values, scale), x @ (values.float() * scale[:, None]).T, rtol=1e-5, atol=1e-6)
    assert calls == []
