"""A shared prompt opening run once: SharedPrefix in the decoder and in MoEEmbedder.features.

Under causal attention a continuation computed after a prefix's keys and
values must get what it gets with the prefix in place. Tolerances are those
of batch invariance (float32 rounding of differently shaped matmuls).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embed_fixtures import TEXTS, build_embedder, build_real_vocab_olmoe, max_rel_error, single_thread  # noqa: F401
from moee_ref.embedding.embedder import FeatureOptions, MoEEmbedder, shared_prefix_ids
from moee_ref.decoder.batch import SharedPrefix
from moee_ref.embedding.prompts import apply_prompt, resolve_prompt
import moee_ref.families

# float32 rounding over every layer. The continuation runs other matmul shapes than the whole sequence, and each
# shape's oneDNN kernel rounds its own way: on an AMD EPYC with AVX-512 and avx512_bf16, DeepSeek-V2 reached
# 1.05e-5 (HS) and 1.007e-5 (probabilities); within 1e-5 on AVX2-only and AMX CPUs.
HS_TOL = 2e-5  # relative to the largest |HS|
PROBS_TOL = 2e-5  # absolute, router probabilities
PROMPTEOL = FeatureOptions(prompt="prompteol")
FAMILIES = tuple(moee_ref.families.FAMILIES)  # every supported family


@pytest.fixture(scope="module", params=FAMILIES)
def embedder(request, tmp_path_factory):
    return build_embedder(tmp_path_factory, request.param, seed=21)


def prompt_ids(embedder: MoEEmbedder, text: str) -> list[int]:
    return embedder.tokenizer.tokenize([apply_prompt(resolve_prompt("prompteol"), text)])[0][0]


def prompteol_prefix(embedder: MoEEmbedder) -> SharedPrefix:
    """The encoded opening of PromptEOL's prompts, as features() uses it."""
    return embedder.model.shared_prefix(shared_prefix_ids(embedder.tokenizer, resolve_prompt("prompteol")))


def left_padded(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, sequences))
    ids = torch.tensor([[0] * (length - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in sequences])
    return ids, mask


def run(embedder, ids, mask, **kwargs):
    with torch.inference_mode():
        return embedder.model(ids, mask, **kwargs)


def record_prefixes(embedder: MoEEmbedder, monkeypatch) -> list:
    """The prefix argument of every batch the embedder runs through its model."""
    seen, real = [], embedder.model.forward

    def forward(*args, prefix=None, **kwargs):
        seen.append(prefix)
        return real(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(embedder.model, "forward", forward)
    return seen


# --- the decoder ---------------------------------------------------------------------------------


def test_the_prompt_opening_is_found_and_encoded(embedder):
    prefix = prompteol_prefix(embedder)
    ids = [prompt_ids(embedder, text) for text in TEXTS]
    assert isinstance(prefix, SharedPrefix) and prefix.length >= 2
    assert all(tuple(seq[: prefix.length]) == prefix.ids for seq in ids)
    # the opening ends where the texts begin: the next tokens differ between texts
    assert len({seq[prefix.length] for seq in ids}) > 1
    args = embedder.args
    assert len(prefix.keys) == len(prefix.values) == args.num_layers
    # values are as wide as keys, except in DeepSeek-V2's latent attention
    value_dim = args.latent_attention.value_dim if args.latent_attention else args.head_dim
    assert prefix.keys[0].shape == (1, args.num_kv_heads, prefix.length, args.head_dim)
    assert prefix.values[-1].shape == (1, args.num_kv_heads, prefix.length, value_dim)


def test_continuation_after_prefix_equals_whole_sequence(embedder):
    sequences = [prompt_ids(embedder, text) for text in TEXTS[:4]]
    prefix = prompteol_prefix(embedder)
    whole = run(embedder, *left_padded(sequences), return_layer_states=True)
    ids, mask = left_padded([seq[prefix.length :] for seq in sequences])
    cont = run(embedder, ids, mask, prefix=prefix, return_layer_states=True)
    for row, seq in enumerate(sequences):
        own = len(seq) - prefix.length  # the continuation's real positions: the last `own` of both batches
        hs_whole, hs_cont = whole.hidden_states[row, -own:], cont.hidden_states[row, -own:]
        assert max_rel_error(hs_cont, hs_whole) <= HS_TOL
        probs_whole, probs_cont = whole.router_probs[row, :, -own:], cont.router_probs[row, :, -own:]
        assert float((probs_cont - probs_whole).abs().max()) <= PROBS_TOL
        assert torch.equal(cont.topk_ids[row, :, -own:], whole.topk_ids[row, :, -own:])
        for state_whole, state_cont in zip(whole.layer_hidden_states, cont.layer_hidden_states):
            assert max_rel_error(state_cont[row, -own:], state_whole[row, -own:]) <= HS_TOL


def test_continuation_at_kept_positions_only(embedder):
    sequences = [prompt_ids(embedder, text) for text in TEXTS[4:8]]
    prefix = prompteol_prefix(embedder)
    ids, mask = left_padded(sequences)
    whole = run(embedder, ids, mask, keep_positions=torch.full((len(sequences), 1), ids.shape[1] - 1))
    ids, mask = left_padded([seq[prefix.length :] for seq in sequences])
    cont = run(embedder, ids, mask, prefix=prefix, keep_positions=torch.full((len(sequences), 1), ids.shape[1] - 1))
    assert cont.hidden_states.shape == whole.hidden_states.shape
    assert max_rel_error(cont.hidden_states, whole.hidden_states) <= HS_TOL
    assert float((cont.router_probs - whole.router_probs).abs().max()) <= PROBS_TOL


def test_a_wrong_prefix_changes_the_result(embedder):
    """The prefix's keys and values are really attended to: another prefix gives other states."""
    sequence = prompt_ids(embedder, TEXTS[0])
    prefix = prompteol_prefix(embedder)
    with torch.inference_mode():
        other = embedder.model.encode_prefix(list(reversed(prefix.ids)))
    ids, mask = left_padded([sequence[prefix.length :]])
    right, wrong = run(embedder, ids, mask, prefix=prefix), run(embedder, ids, mask, prefix=other)
    assert max_rel_error(wrong.hidden_states[0, -1], right.hidden_states[0, -1]) > 1e-3


def test_prefix_runs_no_block_whose_output_nothing_reads(embedder, monkeypatch):
    """encode_prefix needs every layer's keys and values, but the prefix's output only up to the next-to-last block."""
    ran = []
    for index, block in enumerate(embedder.model.layers):
        real = block.forward
        monkeypatch.setattr(block, "forward", lambda *args, index=index, real=real, **kwargs: ran.append(index) or real(*args, **kwargs))
    with torch.inference_mode():
        prefix = embedder.model.encode_prefix(list(prompteol_prefix(embedder).ids))
    layers = embedder.args.num_layers
    assert ran == list(range(layers - 1)) and len(prefix.keys) == len(prefix.values) == layers

# --- the embedder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("hs_layer", ["last", "mean"])
def test_features_with_shared_prefix_equal_features_without(embedder, monkeypatch, batch_size, hs_layer):
    options = FeatureOptions(prompt="prompteol", hs_layer=hs_layer)
    embedder.share_prefix = False
    plain = embedder.features(TEXTS, options, batch_size=batch_size)
    embedder.share_prefix = True
    seen = record_prefixes(embedder, monkeypatch)
    shared = embedder.features(TEXTS, options, batch_size=batch_size)
    assert len(seen) == -(-len(TEXTS) // batch_size) and all(isinstance(p, SharedPrefix) for p in seen)
    assert max_rel_error(shared.hs, plain.hs) <= HS_TOL
    assert float(np.abs(shared.rw - plain.rw).max()) <= PROBS_TOL


def test_no_prefix_for_mean_pooling_without_prompt_or_when_off(embedder, monkeypatch):
    seen = record_prefixes(embedder, monkeypatch)
    embedder.features(TEXTS[:3], FeatureOptions(prompt="prompteol", pooling="mean"))
    embedder.features(TEXTS[:3], FeatureOptions(prompt=None))  # no fixed opening (at most a BOS)
    embedder.share_prefix = False
    try:
        embedder.features(TEXTS[:3], PROMPTEOL)
    finally:
        embedder.share_prefix = True
    assert seen == [None, None, None]
    embedder.features(TEXTS[:3], PROMPTEOL)
    assert isinstance(seen[-1], SharedPrefix)


def test_prefix_encoded_once_per_prompt(embedder, monkeypatch):
    calls, real = [], embedder.model.encode_prefix

    def encode_prefix(ids):
        calls.append(tuple(ids))
        return real(ids)

    embedder.model._prefix = None
    monkeypatch.setattr(embedder.model, "encode_prefix", encode_prefix)
    embedder.features(TEXTS[:2], PROMPTEOL)
    embedder.features(TEXTS[2:5], PROMPTEOL, batch_size=1)
    assert len(calls) == 1
    embedder.features(TEXTS[:2], FeatureOptions(prompt="Summary of {text} in one word:"))
    assert len(calls) == 2 and calls[1] != calls[0]


def test_share_prefix_constructor_option(embedder):
    other = MoEEmbedder(embedder.model, embedder.tokenizer, share_prefix=False)
    assert other.share_prefix is False and MoEEmbedder(embedder.model, embedder.tokenizer).share_prefix is True


# --- a text that merges into the opening (real OLMoE tokenizer) ------------------------------------


@pytest.fixture(scope="module")
def real_vocab_olmoe(tmp_path_factory):
    return build_real_vocab_olmoe(tmp_path_factory, seed=6)


def test_text_merging_into_the_opening_runs_its_batch_whole(real_vocab_olmoe, monkeypatch):
    embedder = real_vocab_olmoe
    prefix = prompteol_prefix(embedder)
    assert [embedder.tokenizer.decode([i]) for i in prefix.ids] == ["This", " sentence", " :", ' "']
    merging = '"Quoted" words.'  # ' "' + '"' tokenize as one token ' ""'
    assert tuple(prompt_ids(embedder, merging)[: prefix.length]) != prefix.ids
    texts = [merging, "Plain words.", "More plain words here."]
    embedder.share_prefix = False
    plain = embedder.features(texts, PROMPTEOL, batch_size=2)
    embedder.share_prefix = True
    seen = record_prefixes(embedder, monkeypatch)
    shared = embedder.features(texts, PROMPTEOL, batch_size=2)
    # longest first: [more plain, merging] runs whole, [plain] shares the opening
    assert seen[0] is None and isinstance(seen[1], SharedPrefix)
    assert max_rel_error(shared.hs, plain.hs) <= HS_TOL
    assert float(np.abs(shared.rw - plain.rw).max()) <= PROBS_TOL


# int8's weight-only kernel rounds its few rows to bf16 (kernels/int8.py), and a shared prefix changes how many rows a
# matmul gets: with it, bf16's rounding (4e-3 measured); without it, int8 is its dequantized float32 matmul exactly.
# The integer path (int8 x int8 where the CPU has VNNI) quantizes each activation row: 6.6e-5 measured on a Zen 4 EPYC.
@pytest.mark.parametrize("load, hs_tol, rw_tol, kernel", [({"int8": True}, HS_TOL, PROBS_TOL, False), ({"int8": True}, 1e-2, 1e-2, True),
                                                          ({"int8": True}, 1e-3, 1e-3, "integer"),
                                                          ({"dtype": torch.float64}, 1e-12, 1e-12, False)])
def test_shared_prefix_with_int8_and_float64_weights(tmp_path_factory, monkeypatch, load, hs_tol, rw_tol, kernel):
    from moee_ref.kernels import int8

    if kernel == "integer":
        if int8.integer_path(torch.float32) is None:
            pytest.skip(f"no int8 x int8 path on this CPU: {int8.integer_reason(torch.float32)}")
    else:
        monkeypatch.setenv(int8.KERNEL_ENV, "weight-only")
    if not kernel:
        monkeypatch.setattr(int8, "int8_kernel_rows", lambda dtype: 0)
    embedder = build_embedder(tmp_path_factory, "qwen2_moe", seed=22, **load)
    embedder.share_prefix = False
    plain = embedder.features(TEXTS, PROMPTEOL, batch_size=3)
    embedder.share_prefix = True
    shared = embedder.features(TEXTS, PROMPTEOL, batch_size=3)
    assert embedder.model._prefix is not None
    assert max_rel_error(shared.hs, plain.hs) <= hs_tol
    assert float(np.abs(shared.rw - plain.rw).max()) <= rw_tol


def test_bad_prefix_is_refused(embedder):
    from moee_ref.errors import InputError

    prefix = prompteol_prefix(embedder)
    ids, mask = left_padded([[5, 6, 7]])
    short = SharedPrefix(prefix.ids, prefix.keys[:-1], prefix.values[:-1])
    layers = embedder.args.num_layers
    with pytest.raises(InputError, match=rf"^prefix must be a SharedPrefix of this model \({layers} layers\); build it with encode_prefix$"):
        run(embedder, ids, mask, prefix=short)
    with pytest.raises(InputError, match="^prefix must be a SharedPrefix"):
        run(embedder, ids, mask, prefix=(prefix.keys, prefix.values))
    limit = embedder.args.max_position_embeddings
    too_long = torch.zeros(1, limit - prefix.length + 1, dtype=torch.long)
    with pytest.raises(InputError, match=rf"^prefix \({prefix.length} tokens\) and input \({limit - prefix.length + 1}\) exceed "
                       rf"max_position_embeddings={limit}; truncate the input$"):
        run(embedder, too_long, torch.ones_like(too_long), prefix=prefix)
