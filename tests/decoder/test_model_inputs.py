"""MoEDecoder inputs and outputs: bad input ids and masks (InputError naming the problem),
padding on either side giving each text exactly what it gets alone, no NaN or inf anywhere,
and the shapes and invariants of the optional outputs and the routing."""

from __future__ import annotations

import pytest
import torch

import moee_ref
import moee_ref.families
from moee_ref.errors import InputError
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint

FAMILIES = tuple(moee_ref.families.FAMILIES)  # every supported family
REL_TOL = 1e-5  # float32: max |batched - alone| / max |alone| on real tokens
WIDTH = 12
LENGTHS = [12, 7, 1, 4]  # a full row, two partly padded rows and one with 1 real token among 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        family: write_random_checkpoint(root / family, SMALL_CONFIGS[family], seed=11, tokenizer=False)
        for family in FAMILIES
    }


@pytest.fixture(scope="module")
def models(checkpoints):
    return {family: moee_ref.load_model(checkpoints[family]) for family in FAMILIES}


@pytest.fixture(scope="module")
def olmoe(models):
    return models["olmoe"]


def padded_batch(vocab_size: int, lengths: list[int], side: str, seed: int = 0):
    """Random ids with the given real lengths, padded to WIDTH; padding holds random ids too,
    so a result that depended on what padding contains would show."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (len(lengths), WIDTH), generator=generator)
    mask = torch.zeros(len(lengths), WIDTH, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, WIDTH - n :] = 1
        else:
            mask[row, :n] = 1
    return ids, mask


def max_rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("bad", [-1, -100, 512, 10_000])
def test_token_id_outside_vocabulary(olmoe, bad):
    assert olmoe.args.vocab_size == 512
    ids = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(InputError, match=rf"token id {bad} is outside the vocabulary \[0, 512\)"):
        olmoe(ids)


def test_last_vocabulary_id_is_accepted(olmoe):
    out = olmoe(torch.tensor([[0, 511]]))
    assert out.hidden_states.shape == (1, 2, 64)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch(olmoe, shape):
    with pytest.raises(InputError, match=rf"empty batch: input_ids has shape \({shape[0]}, {shape[1]}\)"):
        olmoe(torch.zeros(shape, dtype=torch.long))


def test_sequence_longer_than_max_positions(olmoe):
    limit = olmoe.args.max_position_embeddings
    assert limit == 512
    with pytest.raises(InputError, match=r"sequence length 513 exceeds max_position_embeddings=512"):
        olmoe(torch.zeros(1, limit + 1, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bool])
def test_non_integer_input_ids(olmoe, dtype):
    ids = torch.ones(1, 4, dtype=dtype)
    with pytest.raises(InputError, match=rf"input_ids must hold integer token ids, got dtype {dtype}"):
        olmoe(ids)


def test_integer_dtypes_other_than_long_are_accepted(olmoe):
    ids = torch.tensor([[5, 9, 200]])
    ref = olmoe(ids).hidden_states
    assert torch.equal(olmoe(ids.to(torch.int32)).hidden_states, ref)
    assert torch.equal(olmoe(ids.to(torch.int16)).hidden_states, ref)


@pytest.mark.parametrize(
    "ids", [torch.tensor([1, 2, 3]), torch.ones(1, 2, 3, dtype=torch.long), torch.tensor(4), [[1, 2, 3]]],
    ids=["1-D", "3-D", "0-D", "list"],
)
def test_input_ids_not_a_2d_tensor(olmoe, ids):
    with pytest.raises(InputError, match=r"input_ids must be a 2-D tensor \[batch, length\]; wrap a single sequence as \[ids\]"):
        olmoe(ids)


def test_mask_shape_mismatch(olmoe):
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(InputError, match=r"attention_mask shape \(2, 4\) differs from input_ids shape \(2, 5\)"):
        olmoe(ids, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(InputError, match=r"attention_mask shape \(5,\) differs from input_ids shape \(2, 5\)"):
        olmoe(ids, torch.ones(5, dtype=torch.long))


@pytest.mark.parametrize("bad", [2, -1, 0.5], ids=["two", "minus-one", "half"])
def test_mask_values_other_than_zero_and_one(olmoe, bad):
    mask = torch.tensor([[1.0, 1.0, bad, 1.0]])
    with pytest.raises(InputError, match=r"attention_mask must contain only 0 \(padding\) and 1 \(real token\)"):
        olmoe(torch.ones(1, 4, dtype=torch.long), mask)


def test_mask_that_is_not_a_tensor(olmoe):
    with pytest.raises(InputError, match=r"attention_mask must be a tensor \[batch, length\] \(or None\), got list"):
        olmoe(torch.ones(1, 3, dtype=torch.long), [[1, 1, 1]])


def test_row_without_real_token(olmoe):
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    with pytest.raises(InputError, match=r"a row of attention_mask has no real token; drop empty sequences"):
        olmoe(torch.ones(2, 3, dtype=torch.long), mask)


def test_float_and_bool_masks_equal_integer_mask(olmoe):
    ids, mask = padded_batch(512, [5, 2], "left", seed=4)
    ref = olmoe(ids, mask).hidden_states
    assert torch.equal(olmoe(ids, mask.float()).hidden_states, ref)
    assert torch.equal(olmoe(ids, mask.bool()).hidden_states, ref)


# ---------------------------------------------------------------------------
# Padding: each text gets exactly what it gets alone


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padding_gives_each_sequence_its_own_result(models, family, side):
    model = models[family]
    ids, mask = padded_batch(model.args.vocab_size, LENGTHS, side, seed=2)
    batched = model(ids, mask, return_logits=True)
    for row, n in enumerate(LENGTHS):
        real = mask[row].bool()
        assert int(real.sum()) == n
        alone = model(ids[row, real][None])
        assert max_rel_error(batched.hidden_states[row, real], alone.hidden_states[0]) <= REL_TOL
        assert max_rel_error(batched.router_probs[row][:, real], alone.router_probs[0]) <= REL_TOL
        assert max_rel_error(batched.router_logits[row][:, real], alone.router_logits[0]) <= REL_TOL
        assert torch.equal(batched.topk_ids[row][:, real].sort(-1).values, alone.topk_ids[0].sort(-1).values)


def test_padding_content_does_not_matter(olmoe):
    ids, mask = padded_batch(512, LENGTHS, "left", seed=5)
    other = torch.where(mask.bool(), ids, torch.zeros_like(ids))  # same real tokens, padding all id 0
    a, b = olmoe(ids, mask), olmoe(other, mask)
    real = mask.bool()
    # Real tokens never see padding. Not bitwise equal: padding tokens still go through the
    # experts, so the per-expert blocks of tokens (and their matmul rounding) differ.
    assert max_rel_error(a.hidden_states[real], b.hidden_states[real]) <= REL_TOL
    assert max_rel_error(a.router_probs.transpose(1, 2)[real], b.router_probs.transpose(1, 2)[real]) <= REL_TOL


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v2"])  # attention, and latent attention
def test_attention_projections_skip_padding(models, family):
    """Below the last layer every attention projection runs on the real tokens only (padding gets zeros: its keys
    are masked and nothing reads the rest), as the MLP does: on batches of unequal lengths padding is much of the
    work. Checked by the rows each projection receives."""
    model = models[family]
    ids, mask = padded_batch(model.args.vocab_size, LENGTHS, "left", seed=6)
    attn = model.layers[0].attn
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = args[0].reshape(-1, args[0].shape[-1]).shape[0]  # rows, whatever the leading dims
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in attn.named_children() if name.endswith("proj")]
    try:
        model(ids, mask)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen and set(seen.values()) == {sum(LENGTHS)}, seen


# ---------------------------------------------------------------------------
# No NaN or inf anywhere, padded positions included


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_all_outputs_finite(checkpoints, models, family, dtype):
    model = models[family] if dtype == torch.float32 else moee_ref.load_model(checkpoints[family], dtype=dtype)
    lengths = [1, 2, 1, 12]  # mostly padding
    for side in ("left", "right"):
        ids, mask = padded_batch(model.args.vocab_size, lengths, side, seed=9)
        out = model(ids, mask, return_logits=True, return_layer_states=True)
        tensors = {
            "hidden_states": out.hidden_states, "logits": out.logits, "router_logits": out.router_logits,
            "router_probs": out.router_probs, "topk_weights": out.topk_weights,
            **{f"layer_{i}": s for i, s in enumerate(out.layer_hidden_states)},
        }
        for name, tensor in tensors.items():
            assert bool(torch.isfinite(tensor).all()), f"{name} has NaN or inf ({side} padding, {dtype})"
        assert out.hidden_states.dtype == dtype and out.logits.dtype == dtype


# ---------------------------------------------------------------------------
# Optional outputs and routing


def test_logits_only_on_request(olmoe):
    ids, mask = padded_batch(512, [6, 3], "left", seed=1)
    assert olmoe(ids, mask).logits is None
    assert olmoe(ids, mask, return_logits=False).logits is None
    out = olmoe(ids, mask, return_logits=True)
    assert out.logits.shape == (2, WIDTH, 512)
    expected = out.hidden_states @ olmoe.lm_head.weight.T
    assert max_rel_error(out.logits, expected) <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_states(models, family):
    model = models[family]
    ids, mask = padded_batch(model.args.vocab_size, [6, 3], "right", seed=1)
    assert model(ids, mask).layer_hidden_states is None
    out = model(ids, mask, return_layer_states=True)
    states = out.layer_hidden_states
    assert isinstance(states, tuple) and len(states) == model.args.num_layers == 4
    assert all(s.shape == (2, WIDTH, model.args.hidden_size) for s in states)
    # hidden_states is the final norm of the last block's output.
    assert torch.equal(model.norm(states[-1]), out.hidden_states)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_routing_shapes_and_invariants(checkpoints, models, family, dtype):
    model = models[family] if dtype == torch.float32 else moee_ref.load_model(checkpoints[family], dtype=dtype)
    args = model.args
    ids, mask = padded_batch(args.vocab_size, [9, 5, 1], "left", seed=6)
    out = model(ids, mask)
    batch, n_moe, length, experts, k = 3, len(args.moe_layers), WIDTH, args.num_experts, args.top_k
    assert out.moe_layers == args.moe_layers == out.routing.moe_layers
    assert n_moe == {"olmoe": 4, "qwen2_moe": 4, "deepseek": 3, "qwen3_moe": 3, "mixtral": 4, "deepseek_v2": 3, "gpt_oss": 4}[family]
    for tensor in (out.router_logits, out.router_probs):
        assert tensor.shape == (batch, n_moe, length, experts) and tensor.dtype == torch.float32
    assert out.topk_ids.shape == (batch, n_moe, length, k) and out.topk_ids.dtype == torch.int64
    assert out.topk_weights.shape == (batch, n_moe, length, k) and out.topk_weights.dtype == torch.float32

    # Padding tokens are not routed: their router outputs are all zero. The rest hold on real tokens.
    real = mask.bool()[:, None, :].expand(-1, n_moe, -1)
    for tensor in (out.router_logits, out.router_probs, out.topk_ids, out.topk_weights):
        assert not tensor[~real].any()
    probs, logits = out.router_probs[real], out.router_logits[real]
    ids_real, weights_real = out.topk_ids[real], out.topk_weights[real]
    assert float((probs.sum(-1) - 1).abs().max()) <= 1e-6
    assert float((probs - logits.softmax(-1)).abs().max()) <= 1e-6
    # The chosen experts are the k most probable ones, with their probabilities as weights,
    # renormalised to sum to one where the family does that (Qwen3-MoE's config, Mixtral always).
    # DeepSeek-V2's group-limited router picks them among the best groups' experts only.
    chosen = probs.gather(-1, ids_real)
    if args.norm_topk_prob:
        assert float((weights_real - chosen / chosen.sum(-1, keepdim=True)).abs().max()) <= 1e-7
    else:  # times DeepSeek-V2's routed_scaling_factor, 1 elsewhere
        assert torch.equal(weights_real, chosen * args.routed_scaling_factor)
    kth_best = probs.topk(k, dim=-1).values[..., -1:]
    if args.num_groups == 1:
        assert bool((chosen >= kth_best).all())
    else:  # the best k among the experts of the best groups: never above the overall k-th best
        group_best = probs.view(len(probs), args.num_groups, -1).max(-1).values
        kept = group_best.topk(args.topk_group, dim=-1).indices
        assert bool(((ids_real // (experts // args.num_groups))[..., :, None] == kept[:, None, :]).any(-1).all())
    assert bool((ids_real >= 0).all() and (ids_real < experts).all())
    # the k experts of a token are distinct
    assert bool((ids_real.sort(-1).values.diff(dim=-1) > 0).all())
