"""MoEEmbedder in its default mode, on small random checkpoints of each family.

Ground truth is computed by hand: the tokenizer's ids and one direct call of
the decoder (embed_fixtures.hand_last_token / run_alone), never the
embedder's own batching. Tolerances: float32 features computed in another
batch agree within a max relative error (max |a - b| / max |b|) of 1e-5;
identities of the moee-sum construction hold within 1e-6 absolute.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from embed_fixtures import (  # noqa: F401  (fixtures are used by name)
    OLMOE_TOKENIZER,
    TEXTS,
    build_real_vocab_olmoe,
    cosine,
    deepseek,
    embedders,
    hand_last_token,
    max_rel_error,
    newer,
    olmoe,
    qwen,
    run_alone,
    single_thread,
)
from moee_ref.embedding.alpha import SUPERVISED_CRITERION, UNSUPERVISED_CRITERION, AlphaChoice
from moee_ref.embedding.embedder import KINDS, MoEEmbedder, alpha_over_all_pairs
from moee_ref.errors import InputError
from moee_ref.embedding.prompts import BUILTIN_PROMPTS, apply_prompt, resolve_prompt
from moee_ref.embedding.standardize import Standardizer
import moee_ref.families

BATCH_TOL = 1e-5  # float32, same text computed in different batches
IDENTITY_TOL = 1e-6
FAMILIES = tuple(moee_ref.families.FAMILIES)  # every supported family


def widths(embedder):
    args = embedder.args
    d, rw = args.hidden_size, len(args.moe_layers) * args.num_experts
    return {"hs": d, "rw": rw, "moee-concat": d + rw, "moee-sum": d + rw}


# --- kinds -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kind_has_its_width_and_float32(embedders, family):
    embedder = embedders[family]
    expected = widths(embedder)
    # deepseek's first layer is dense (and the Qwen3 demo's): 3 MoE layers of 16 experts, not 4
    assert expected["rw"] == {"olmoe": 4 * 16, "qwen2_moe": 4 * 15, "deepseek": 3 * 16, "qwen3_moe": 3 * 16, "mixtral": 4 * 8, "deepseek_v2": 3 * 16, "gpt_oss": 4 * 8}[family]
    for kind in KINDS:
        vectors = embedder.encode(TEXTS, kind)
        assert vectors.shape == (len(TEXTS), expected[kind])
        assert vectors.dtype == np.float32
        assert embedder.dimension(kind) == expected[kind]
        assert np.all(np.isfinite(vectors))


def test_outputs_follow_input_order(olmoe):
    permutation = [5, 2, 7, 0, 3, 6, 1, 4]
    for kind in KINDS:
        vectors = olmoe.encode(TEXTS, kind)
        permuted = olmoe.encode([TEXTS[i] for i in permutation], kind)
        assert max_rel_error(permuted, vectors[permutation]) <= BATCH_TOL
        # the rows really differ, so a wrong order would be seen
        assert np.abs(vectors[0] - vectors[1]).max() > 1e-2


def test_moee_concat_is_hs_then_rw(olmoe):
    hs, rw = olmoe.encode(TEXTS, "hs"), olmoe.encode(TEXTS, "rw")
    np.testing.assert_array_equal(olmoe.encode(TEXTS, "moee-concat"), np.concatenate([hs, rw], axis=1))


# --- HS and RW against the decoder ------------------------------------------


@pytest.mark.parametrize("family", ["olmoe", "deepseek"])  # without and with a BOS token
def test_hs_and_rw_are_the_last_real_token_outputs(embedders, family):
    embedder = embedders[family]
    target = TEXTS[1]  # short: it is left padded in the batch below
    hs, rw = hand_last_token(embedder, target)
    alone_hs, alone_rw = embedder.encode([target], "hs")[0], embedder.encode([target], "rw")[0]
    assert max_rel_error(alone_hs, hs) <= BATCH_TOL
    assert max_rel_error(alone_rw, rw) <= BATCH_TOL
    batch_hs, batch_rw = embedder.encode(TEXTS, "hs")[1], embedder.encode(TEXTS, "rw")[1]
    assert max_rel_error(batch_hs, hs) <= BATCH_TOL
    assert max_rel_error(batch_rw, rw) <= BATCH_TOL
    # RW is a softmax per MoE layer
    per_layer = batch_rw.reshape(len(embedder.args.moe_layers), embedder.args.num_experts)
    np.testing.assert_allclose(per_layer.sum(1), 1.0, atol=1e-5)


def test_rw_values_logits_are_the_router_logits(olmoe):
    _, logits = hand_last_token(olmoe, TEXTS[0], rw_values="logits")
    _, probs = hand_last_token(olmoe, TEXTS[0], rw_values="probs")
    got = olmoe.encode(TEXTS[:3], "rw", rw_values="logits")[0]
    assert max_rel_error(got, logits) <= BATCH_TOL
    assert np.abs(got - probs).max() > 0.1


# --- moee-sum ----------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 3.0])
def test_moee_sum_dot_product_is_the_weighted_sum_of_cosines(olmoe, alpha):
    hs, rw = olmoe.encode(TEXTS, "hs"), olmoe.encode(TEXTS, "rw")
    vectors = olmoe.encode(TEXTS, "moee-sum", alpha=alpha).astype(np.float64)
    for i, j in itertools.combinations(range(len(TEXTS)), 2):
        expected = cosine(hs[i], hs[j]) + alpha * cosine(rw[i], rw[j])
        assert abs(vectors[i] @ vectors[j] - expected) <= IDENTITY_TOL
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), math.sqrt(1 + alpha), atol=IDENTITY_TOL)
    unit = olmoe.encode(TEXTS, "moee-sum", alpha=alpha, normalize=True).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=IDENTITY_TOL)
    np.testing.assert_allclose(unit, vectors / math.sqrt(1 + alpha), atol=IDENTITY_TOL)


def test_normalize_gives_unit_rows_for_every_kind(olmoe):
    for kind in KINDS:
        vectors = olmoe.encode(TEXTS[:4], kind, normalize=True)
        np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float64), axis=1), 1.0, atol=IDENTITY_TOL)


# --- ablations -----------------------------------------------------------------


def test_mean_pooling_is_the_mean_over_real_tokens(olmoe):
    target = TEXTS[3]  # the shortest but one: heavily padded next to TEXTS[2]
    out = run_alone(olmoe, olmoe.tokenizer.encode(target))
    hand_hs = out.hidden_states[0].mean(0).numpy()
    hand_rw = out.router_probs[0].mean(1).reshape(-1).numpy()  # [L, T, E] -> mean over T -> layer-major
    hs = olmoe.encode([TEXTS[2], target], "hs", pooling="mean")[1]
    rw = olmoe.encode([TEXTS[2], target], "rw", pooling="mean")[1]
    assert max_rel_error(hs, hand_hs) <= BATCH_TOL
    assert max_rel_error(rw, hand_rw) <= BATCH_TOL
    assert np.abs(hs - olmoe.encode([target], "hs")[0]).max() > 1e-2  # not the last token


def test_hs_layer_mean_averages_block_outputs_with_the_last_normed(olmoe):
    target = TEXTS[1]
    out = run_alone(olmoe, olmoe.tokenizer.encode(target), return_layer_states=True)
    assert len(out.layer_hidden_states) == olmoe.args.num_layers
    states = [s[0, -1] for s in out.layer_hidden_states[:-1]] + [out.hidden_states[0, -1]]
    hand = torch.stack(states).mean(0).numpy()
    got = olmoe.encode([TEXTS[0], target], "hs", hs_layer="mean")[1]
    assert max_rel_error(got, hand) <= BATCH_TOL
    # the un-normed last block output is not what is averaged
    raw = torch.stack([s[0, -1] for s in out.layer_hidden_states]).mean(0).numpy()
    assert np.abs(got - raw).max() > 1e-2
    # RW does not depend on hs_layer
    np.testing.assert_array_equal(
        olmoe.encode([target], "rw", hs_layer="mean"), olmoe.encode([target], "rw")
    )


def test_rw_layers_select_their_slices_in_the_given_order(olmoe):
    experts = olmoe.args.num_experts
    full = olmoe.encode(TEXTS[:4], "rw")
    subset = olmoe.encode(TEXTS[:4], "rw", rw_layers=[2, 0])
    assert subset.shape == (4, 2 * experts)
    assert olmoe.dimension("rw", rw_layers=[2, 0]) == 2 * experts
    np.testing.assert_array_equal(subset[:, :experts], full[:, 2 * experts : 3 * experts])
    np.testing.assert_array_equal(subset[:, experts:], full[:, :experts])
    concat = olmoe.encode(TEXTS[:4], "moee-concat", rw_layers=[3])
    assert concat.shape == (4, olmoe.args.hidden_size + experts)


def test_rw_layers_refuse_dense_and_missing_layers(deepseek):
    assert deepseek.args.moe_layers == (1, 2, 3)
    with pytest.raises(InputError, match=r"rw_layers \[0\] are not MoE layers of this model; choose from \[1, 2, 3\]"):
        deepseek.encode(TEXTS[:2], "rw", rw_layers=[0, 1])
    with pytest.raises(InputError, match=r"rw_layers \[7\] are not MoE layers"):
        deepseek.encode(TEXTS[:2], "rw", rw_layers=[7])
    with pytest.raises(InputError, match=r"rw_layers must be a non-empty list.*\[1, 2, 3\]"):
        deepseek.encode(TEXTS[:2], "rw", rw_layers=[])
    # layer 1 is the first MoE layer: the first slice of the full RW
    first = deepseek.encode(TEXTS[:2], "rw", rw_layers=[1])
    np.testing.assert_array_equal(first, deepseek.encode(TEXTS[:2], "rw")[:, : deepseek.args.num_experts])


@pytest.mark.parametrize(
    "option, value, valid",
    [
        ("pooling", "max", "'last', 'mean'"),
        ("hs_layer", "first", "'last', 'mean'"),
        ("rw_values", "softmax", "'probs', 'logits'"),
    ],
)
def test_unknown_ablation_values_are_refused(olmoe, option, value, valid):
    with pytest.raises(InputError, match=f"{option}='{value}' is not valid; choose one of {valid}"):
        olmoe.encode(TEXTS[:2], "hs", **{option: value})


def test_unknown_feature_option_is_a_type_error(olmoe):
    with pytest.raises(TypeError, match="poolin"):
        olmoe.encode(TEXTS[:2], "hs", poolin="mean")


# --- prompts -------------------------------------------------------------------


def test_prompt_name_and_equal_template_give_the_same_vectors(olmoe):
    by_name = olmoe.encode(TEXTS[:4], "moee-concat", prompt="prompteol")
    by_template = olmoe.encode(TEXTS[:4], "moee-concat", prompt=BUILTIN_PROMPTS["prompteol"])
    np.testing.assert_array_equal(by_name, by_template)
    # case-insensitive names, and the prompt really is applied
    np.testing.assert_array_equal(olmoe.encode(TEXTS[:4], "moee-concat", prompt="PromptEOL"), by_name)
    assert np.abs(by_name - olmoe.encode(TEXTS[:4], "moee-concat")).max() > 1e-2


def test_custom_template_is_the_text_fed_to_the_model(olmoe):
    template = 'Summary of {"json": 1} -> "{text}" in one word:'
    hs, _ = hand_last_token(olmoe, 'Summary of {"json": 1} -> "' + TEXTS[0] + '" in one word:')
    assert max_rel_error(olmoe.encode([TEXTS[0]], "hs", prompt=template)[0], hs) <= BATCH_TOL


def test_unknown_prompt_name_lists_the_valid_names(olmoe):
    names = ", ".join(BUILTIN_PROMPTS)
    with pytest.raises(InputError, match=f"unknown prompt 'promptEOLL'.*Built-in names: {names}"):
        olmoe.encode(TEXTS[:2], prompt="promptEOLL")


def test_template_without_placeholder_is_a_prefix(olmoe):
    """As in sentence-transformers: a prompt without {text} that is not one bare word is a prefix of the text."""
    prefix = "Describe this sentence in one word:"
    assert np.array_equal(olmoe.encode(TEXTS[:2], "hs", prompt=prefix), olmoe.encode(TEXTS[:2], "hs", prompt=prefix + "{text}"))


def test_list_prompts_has_the_ten_builtins():
    prompts = MoEEmbedder.list_prompts()
    assert len(prompts) == 10
    assert [name for name, _ in prompts][:2] == ["none", "prompteol"]
    assert all("{text}" in template for _, template in prompts)


# --- determinism and batch invariance --------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_text_gets_one_vector_whatever_its_batch(olmoe, kind):
    target = TEXTS[4]
    alone = olmoe.encode([target], kind)[0]
    shorter_and_longer = olmoe.encode([TEXTS[7], target, TEXTS[2]], kind)[1]
    assert max_rel_error(shorter_and_longer, alone) <= BATCH_TOL
    for batch_size in (1, 2, 3, 7):
        vectors = olmoe.encode(TEXTS, kind, batch_size=batch_size)
        assert max_rel_error(vectors[4], alone) <= BATCH_TOL, batch_size
    again = olmoe.encode(TEXTS, kind, batch_size=3)
    np.testing.assert_array_equal(again, olmoe.encode(TEXTS, kind, batch_size=3))


def test_constructor_batch_size_is_the_default(tmp_path_factory, olmoe):
    small = MoEEmbedder(olmoe.model, olmoe.tokenizer, batch_size=2)
    assert small.batch_size == 2
    assert max_rel_error(small.encode(TEXTS, "hs"), olmoe.encode(TEXTS, "hs")) <= BATCH_TOL


# --- standardisation ---------------------------------------------------------------


@pytest.fixture(scope="module")
def rw_standardizer(olmoe, tmp_path_factory):
    fitted = olmoe.fit_standardizer(TEXTS, component="rw")
    path = tmp_path_factory.mktemp("std") / "rw.npz"
    fitted.save(path)
    return Standardizer.load(path)


def test_saved_and_loaded_standardizer_is_applied_on_request(olmoe, rw_standardizer):
    raw = olmoe.encode(TEXTS, "rw").astype(np.float64)
    mean, std = raw.mean(0), raw.std(0, ddof=1)
    assert rw_standardizer.kind == "rw" and rw_standardizer.width == raw.shape[1]
    np.testing.assert_allclose(rw_standardizer.mean, mean, rtol=0, atol=1e-7)
    np.testing.assert_allclose(rw_standardizer.std, std, rtol=1e-4, atol=1e-8)

    new_texts = ["Fresh bread and olives.", "The bridge was closed for repairs."]
    got = olmoe.encode(new_texts, "rw", standardizer=rw_standardizer)
    new_raw = olmoe.encode(new_texts, "rw").astype(np.float64)
    expected = (new_raw - rw_standardizer.mean) / (rw_standardizer.std + 1e-8)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # the manual statistics give the same result up to float32 feature noise
    assert max_rel_error(got, (new_raw - mean) / (std + 1e-8)) <= 1e-4


def test_standardizer_is_never_applied_silently(olmoe, rw_standardizer):
    raw = olmoe.encode(TEXTS, "rw")
    olmoe.fit_standardizer(TEXTS, component="rw")  # fitting leaves the embedder unchanged
    np.testing.assert_array_equal(olmoe.encode(TEXTS, "rw"), raw)
    assert np.all(raw >= 0)  # probabilities, not standardised values
    standardized = olmoe.encode(TEXTS, "rw", standardizer=rw_standardizer)
    np.testing.assert_allclose(standardized.mean(0), 0.0, atol=1e-4)


def test_standardizer_of_another_width_is_refused(olmoe, rw_standardizer):
    one_layer = olmoe.fit_standardizer(TEXTS, component="rw", rw_layers=[1])
    assert one_layer.width == olmoe.args.num_experts
    with pytest.raises(InputError, match=r"input has width 64 but the standardizer fitted for 'rw' has width 16"):
        olmoe.encode(TEXTS[:2], "rw", standardizer=one_layer)
    with pytest.raises(InputError, match=r"input has width 16 but the standardizer fitted for 'rw' has width 64"):
        olmoe.encode(TEXTS[:2], "rw", rw_layers=[1], standardizer=rw_standardizer)


def test_hs_and_rw_standardizers_together(olmoe, rw_standardizer):
    hs_standardizer = olmoe.fit_standardizer(TEXTS, component="hs")
    assert hs_standardizer.kind == "hs" and hs_standardizer.width == olmoe.args.hidden_size
    texts = TEXTS[:3]
    hs, rw = olmoe.encode(texts, "hs"), olmoe.encode(texts, "rw")
    hs_z, rw_z = hs_standardizer.transform(hs), rw_standardizer.transform(rw)
    both = [rw_standardizer, hs_standardizer]
    np.testing.assert_allclose(olmoe.encode(texts, "moee-concat", standardizer=both), np.hstack([hs_z, rw_z]), atol=1e-5)
    np.testing.assert_allclose(olmoe.encode(texts, "hs", standardizer=both), hs_z, atol=1e-5)
    summed = olmoe.encode(texts, "moee-sum", alpha=2.0, standardizer=both).astype(np.float64)
    for i, j in itertools.combinations(range(3), 2):
        assert abs(summed[i] @ summed[j] - cosine(hs_z[i], hs_z[j]) - 2.0 * cosine(rw_z[i], rw_z[j])) <= IDENTITY_TOL
    # an hs standardizer alone leaves RW raw
    np.testing.assert_array_equal(olmoe.encode(texts, "rw", standardizer=hs_standardizer), rw)


def test_two_standardizers_of_one_component_are_refused(olmoe, rw_standardizer):
    with pytest.raises(InputError, match="standardizer kind 'rw': expected one standardizer per component"):
        olmoe.encode(TEXTS[:2], "rw", standardizer=[rw_standardizer, rw_standardizer])
    foreign = Standardizer(mean=np.zeros(64), std=np.ones(64), kind="rw:olmoe")
    with pytest.raises(InputError, match="standardizer kind 'rw:olmoe'"):
        olmoe.encode(TEXTS[:2], "rw", standardizer=foreign)
    with pytest.raises(InputError, match="standardizer must be a Standardizer .*got str"):
        olmoe.encode(TEXTS[:2], "rw", standardizer=["rw.npz"])
    with pytest.raises(InputError, match="component='moee' is not valid; choose 'hs' or 'rw'"):
        olmoe.fit_standardizer(TEXTS, component="moee")


# --- alpha ---------------------------------------------------------------------------


def _pair_texts(count: int, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic pairs of varied short sentences."""
    subjects = ["The cat", "A doctor", "Our team", "The orchestra", "Children", "The committee", "She", "The train"]
    verbs = ["approved", "played", "watched", "forgot", "measured", "sold", "repaired", "painted"]
    objects = ["the budget", "a symphony", "the old bridge", "fresh bread", "three letters", "the garden",
               "the results", "a museum", "the weather report", "sea shells"]
    rng = np.random.default_rng(seed)

    def sentence():
        return f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."

    return [sentence() for _ in range(count)], [sentence() for _ in range(count)]


@pytest.fixture(scope="module")
def pairs():
    return _pair_texts(60, seed=4)


def test_numeric_alpha_is_reported(olmoe):
    olmoe.encode(TEXTS, "moee-sum", alpha=0.5)
    assert olmoe.last_report.alpha == 0.5 and olmoe.last_report.alpha_choice is None
    olmoe.encode(TEXTS, "moee-sum", alpha=2)  # an int is a number too
    assert olmoe.last_report.alpha == 2.0
    olmoe.encode(TEXTS, "hs")
    assert olmoe.last_report.alpha is None


def test_auto_alpha_over_given_pairs(olmoe, pairs):
    a, b = pairs
    vectors = olmoe.encode(TEXTS, "moee-sum", alpha="auto", alpha_pairs=(a, b))
    choice = olmoe.last_report.alpha_choice
    assert isinstance(choice, AlphaChoice) and choice.criterion == UNSUPERVISED_CRITERION
    assert olmoe.last_report.alpha == choice.alpha
    assert choice == olmoe.select_alpha(a, b)
    np.testing.assert_array_equal(vectors, olmoe.encode(TEXTS, "moee-sum", alpha=choice.alpha))
    # deterministic
    np.testing.assert_array_equal(olmoe.encode(TEXTS, "moee-sum", alpha="auto", alpha_pairs=(a, b)), vectors)
    assert olmoe.last_report.alpha_choice == choice


def test_auto_alpha_over_pairs_sees_the_standardised_features(olmoe, pairs, rw_standardizer):
    a, b = pairs
    olmoe.encode(TEXTS, "moee-sum", alpha="auto", alpha_pairs=(a, b), standardizer=rw_standardizer)
    assert olmoe.last_report.alpha_choice == olmoe.select_alpha(a, b, standardizer=rw_standardizer)


def test_auto_alpha_without_pairs_uses_pairs_among_the_texts(olmoe):
    vectors = olmoe.encode(TEXTS, "moee-sum", alpha="auto")
    choice = olmoe.last_report.alpha_choice
    expected = alpha_over_all_pairs(olmoe.encode(TEXTS, "hs"), olmoe.encode(TEXTS, "rw"))
    assert choice == expected and choice.criterion == UNSUPERVISED_CRITERION
    np.testing.assert_array_equal(olmoe.encode(TEXTS, "moee-sum", alpha="auto"), vectors)
    with pytest.raises(InputError, match="alpha='auto' needs at least 8 distinct texts to choose alpha reliably, got 2"):
        olmoe.encode(TEXTS[:2], "moee-sum", alpha="auto")


def test_alpha_choice_from_select_alpha_is_used(olmoe, pairs):
    choice = olmoe.select_alpha(*pairs)
    vectors = olmoe.encode(TEXTS, "moee-sum", alpha=choice)
    assert olmoe.last_report.alpha_choice is choice
    np.testing.assert_array_equal(vectors, olmoe.encode(TEXTS, "moee-sum", alpha=choice.alpha))


def test_supervised_alpha_recovers_the_weight_of_gold_built_from_the_features(olmoe, pairs):
    a, b = pairs
    hs_a, hs_b = olmoe.encode(a, "hs"), olmoe.encode(b, "hs")
    rw_a, rw_b = olmoe.encode(a, "rw"), olmoe.encode(b, "rw")
    cos_hs = np.array([cosine(x, y) for x, y in zip(hs_a, hs_b)])
    cos_rw = np.array([cosine(x, y) for x, y in zip(rw_a, rw_b)])
    assert abs(np.corrcoef(cos_hs, cos_rw)[0, 1]) < 0.95  # two distinct signals to weigh
    choice = olmoe.select_alpha(a, b, gold=cos_hs + 0.7 * cos_rw)
    assert choice.criterion == SUPERVISED_CRITERION
    assert choice.alpha == pytest.approx(0.7, rel=0.02)
    assert choice.score == pytest.approx(1.0)


def test_select_alpha_refuses_unpaired_lists(olmoe):
    with pytest.raises(InputError, match="texts_a has 3 texts but texts_b has 2"):
        olmoe.select_alpha(TEXTS[:3], TEXTS[:2])


@pytest.mark.parametrize(
    "alpha, message",
    [
        (-1, "alpha must be a finite number >= 0, 'auto' or an AlphaChoice; got -1"),
        (float("nan"), "alpha must be a finite number >= 0, 'auto' or an AlphaChoice; got nan"),
        (float("inf"), "alpha must be a finite number >= 0"),
        (True, "alpha must be a finite number >= 0"),
        ("best", "alpha='best' is not valid; give a number >= 0, 'auto' or an AlphaChoice"),
        (AlphaChoice(alpha=-0.5, score=0.0, criterion="hand-made"), "got -0.5"),
    ],
)
def test_invalid_alpha_is_refused(olmoe, alpha, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        olmoe.encode(TEXTS[:3], "moee-sum", alpha=alpha)


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("blank", ["", "   \t\n"])
def test_empty_texts_are_refused_by_index(olmoe, blank):
    with pytest.raises(InputError, match="text at index 2 is empty or whitespace only.*allow_empty=True"):
        olmoe.encode([TEXTS[0], TEXTS[1], blank, TEXTS[3]], "hs")


def test_allow_empty_embeds_the_prompt_around_an_empty_text(olmoe):
    vectors = olmoe.encode(["", "  ", TEXTS[0]], "moee-concat", prompt="prompteol", allow_empty=True)
    assert vectors.shape == (3, olmoe.dimension("moee-concat"))
    hs, _ = hand_last_token(olmoe, BUILTIN_PROMPTS["prompteol"].replace("{text}", ""))
    assert max_rel_error(vectors[0, : olmoe.args.hidden_size], hs) <= BATCH_TOL
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3  # the whitespace is part of the text


@pytest.mark.parametrize(
    "texts, message",
    [
        (["fine", 5], "text at index 1 is int, not str"),
        ([None, "fine"], "text at index 0 is NoneType, not str"),
        (["fine", b"bytes"], "text at index 1 is bytes, not str"),
        ({"a": 1}, "texts must be a list or tuple of strings, got dict"),
    ],
)
def test_non_text_input_is_refused(olmoe, texts, message):
    with pytest.raises(InputError, match=message):
        olmoe.encode(texts, "hs")


@pytest.mark.parametrize("kind", KINDS)
def test_empty_list_gives_an_empty_matrix(olmoe, kind):
    for empty in ([], ()):
        vectors = olmoe.encode(empty, kind)
        assert isinstance(vectors, np.ndarray)
        assert vectors.shape == (0, olmoe.dimension(kind)) and vectors.dtype == np.float32
    assert olmoe.encode([], kind, rw_layers=[1]).shape == (0, olmoe.dimension(kind, rw_layers=[1]))


def test_unknown_kind_lists_the_kinds(olmoe):
    with pytest.raises(InputError, match="kind='moee' is not valid; choose one of hs, rw, moee-concat, moee-sum"):
        olmoe.encode(TEXTS[:2], "moee")
    with pytest.raises(InputError, match="kind='HS' is not valid"):
        olmoe.dimension("HS")


def _long_text(embedder, tokens: int) -> str:
    words = " ".join(TEXTS[:3])
    assert len(embedder.tokenizer.encode(words)) >= tokens
    return words


def test_over_long_texts_are_refused_without_truncation(olmoe):
    long = _long_text(olmoe, 20)
    with pytest.raises(
        InputError,
        match=r"1 text\(s\) exceed max_length=8 tokens \(first at index 1, \d+ tokens\); "
        r"pass truncation='right' \(keep the beginning\) or 'left' \(keep the end\)",
    ):
        olmoe.encode(["Cats sleep.", long], "hs", max_length=8)
    with pytest.raises(InputError, match="truncation='middle' is not valid"):
        olmoe.encode(["Cats sleep.", long], "hs", max_length=8, truncation="middle")


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_keeps_the_chosen_end(olmoe, side):
    long = _long_text(olmoe, 20)
    ids = olmoe.tokenizer.encode(long)
    kept = ids[-8:] if side == "left" else ids[:8]
    hand = run_alone(olmoe, kept).hidden_states[0, -1].numpy()
    vectors = olmoe.encode(["Cats sleep.", long, long + " Again."], "hs", max_length=8, truncation=side)
    assert olmoe.last_report.num_truncated == 2
    assert any("2 of 3 texts were truncated" in note for note in olmoe.last_report.notes)
    assert max_rel_error(vectors[1], hand) <= BATCH_TOL
    assert max_rel_error(vectors[0], olmoe.encode(["Cats sleep."], "hs")[0]) <= BATCH_TOL  # short: untouched
    olmoe.encode(["Cats sleep."], "hs", max_length=8, truncation=side)
    assert olmoe.last_report.num_truncated == 0 and olmoe.last_report.notes == []


def test_truncation_never_cuts_the_bos(deepseek):
    long = _long_text(deepseek, 20)
    ids = deepseek.tokenizer.encode(long)
    assert ids[0] == deepseek.tokenizer.bos_id
    hand = run_alone(deepseek, ids[:1] + ids[-7:]).hidden_states[0, -1].numpy()
    got = deepseek.encode([long], "hs", max_length=8, truncation="left")[0]
    assert max_rel_error(got, hand) <= BATCH_TOL


def test_truncation_cuts_the_text_never_the_prompt(olmoe):
    """With PromptEOL the closing words are what the last token reads: they must survive truncation."""
    long = _long_text(olmoe, 40)
    template = resolve_prompt("prompteol")
    whole = olmoe.tokenizer.encode(apply_prompt(template, long))
    budget = len(whole) - 10
    for side in ("left", "right"):
        got = olmoe.encode([long], "hs", prompt="prompteol", max_length=budget, truncation=side)[0]
        assert olmoe.last_report.num_truncated == 1
        # Rebuild the expected input by hand: the longest cut of the text's own tokens that fits with the prompt.
        text_ids = olmoe.tokenizer.encode(long, add_special_tokens=False)
        for keep in range(len(text_ids), -1, -1):
            piece = text_ids[:keep] if side == "right" else text_ids[len(text_ids) - keep :]
            ids = olmoe.tokenizer.encode(apply_prompt(template, olmoe.tokenizer.decode(piece)))
            if len(ids) <= budget:
                break
        suffix = olmoe.tokenizer.encode('" means in one word:"', add_special_tokens=False)
        assert ids[-len(suffix):] == suffix  # the prompt's end is intact
        assert max_rel_error(got, run_alone(olmoe, ids).hidden_states[0, -1].numpy()) <= BATCH_TOL


def test_prompt_longer_than_max_length_is_refused(olmoe):
    with pytest.raises(InputError, match=r"the prompt alone takes \d+ tokens, more than max_length=3"):
        olmoe.encode(["A cat sat on the mat for a long while."], "hs", prompt="prompteol", max_length=3, truncation="left")


def test_allow_empty_without_any_token_gives_a_zero_vector(olmoe):
    """No prompt and no BOS: an empty text has no token at all; it gets a zero row (cosine 0), never NaN."""
    assert not olmoe.tokenizer.adds_bos
    vectors = olmoe.encode(["Cats sleep.", ""], "moee-sum", allow_empty=True)
    assert np.all(vectors[1] == 0) and np.all(np.isfinite(vectors))
    assert max_rel_error(vectors[0], olmoe.encode(["Cats sleep."], "moee-sum")[0]) <= BATCH_TOL


def test_alpha_pairs_go_with_auto_alpha_only(olmoe):
    with pytest.raises(InputError, match="alpha_pairs are the unlabeled pairs for alpha='auto'"):
        olmoe.encode(["Cats sleep."], "moee-sum", alpha=1.0, alpha_pairs=(["a"], ["b"]))
    with pytest.raises(InputError, match=r"alpha_pairs must be \(texts_a, texts_b\)"):
        olmoe.encode(["Cats sleep."], "moee-sum", alpha="auto", alpha_pairs=["a", "b", "c"])


@pytest.mark.parametrize("max_length", [0, 513, 10_000, 8.5, "8"])
def test_max_length_outside_the_model_is_refused(olmoe, max_length):
    assert olmoe.args.max_position_embeddings == 512
    with pytest.raises(InputError, match=r"max_length=.* must lie in \[1, 512\] \(the model's max_position_embeddings\)"):
        olmoe.encode(TEXTS[:2], "hs", max_length=max_length, truncation="right")


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "4"])
def test_bad_batch_size_is_refused(olmoe, batch_size):
    with pytest.raises(InputError, match=f"batch_size must be a positive integer, got {batch_size!r}".replace(".", r"\.")):
        olmoe.encode(TEXTS[:2], "hs", batch_size=batch_size)
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        MoEEmbedder(olmoe.model, olmoe.tokenizer, batch_size=batch_size)


def test_mode_and_unknown_options_are_refused(olmoe):
    with pytest.raises(InputError, match=r"^encode\(\) takes no mode: the authors' computation is its own entry point, "
                       r"moee_ref\.encode_official\(embedder, texts, kind, \.\.\.\)$"):
        olmoe.encode(TEXTS[:2], "hs", mode="official")
    takes = ("texts, kind, prompt, alpha, alpha_pairs, batch_size, max_length, truncation, normalize, standardizer, "
             "show_progress_bar, normalize_embeddings, prompt_name, truncate_dim, precision, convert_to_numpy, "
             "convert_to_tensor, pooling, hs_layer, rw_values, rw_layers, allow_empty")
    with pytest.raises(InputError, match=rf"^encode\(\) got unknown option\(s\) 'poolling' \(did you mean 'pooling'\?\); it takes {takes}$"):
        olmoe.encode(TEXTS[:2], "hs", poolling="mean")
    with pytest.raises(InputError, match=r"^select_alpha\(\) got unknown option\(s\) 'stride', 'x'; "):
        olmoe.select_alpha(TEXTS[:3], TEXTS[3:6], stride=2, x=1)
    with pytest.raises(InputError, match=r"^fit_standardizer\(\) got unknown option\(s\) 'normalise'; it takes texts, component, "):
        olmoe.fit_standardizer(TEXTS[:3], normalise=True)


# --- progress bar ------------------------------------------------------------------------


def test_progress_bar_on_request_only(olmoe, capfd):
    olmoe.encode(TEXTS, "hs", batch_size=2, show_progress_bar=True)
    err = capfd.readouterr().err
    assert "embedding" in err and "4/4" in err and "batch" in err
    olmoe.encode(TEXTS, "hs", batch_size=2, show_progress_bar=False)
    olmoe.encode(TEXTS, "hs", batch_size=2)  # few texts: no bar by default
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


# --- the real OLMoE tokenizer ---------------------------------------------------------------

@pytest.fixture(scope="module")
def real_vocab_olmoe(tmp_path_factory):
    return build_real_vocab_olmoe(tmp_path_factory, seed=5)


def test_real_olmoe_tokenizer_end_to_end(real_vocab_olmoe):
    import tokenizers

    embedder = real_vocab_olmoe
    assert embedder.tokenizer.vocab_size == 50280 and embedder.tokenizer.pad_id == 1
    texts = ["Hello world", TEXTS[0], "Naïve café, 3.5 percent — ok?"]
    for kind in KINDS:
        vectors = embedder.encode(texts, kind, prompt="prompteol")
        assert vectors.shape == (3, embedder.dimension(kind)) and np.all(np.isfinite(vectors))
    # the "none" prompt: HS is the model's last-token state for the real tokenizer's ids
    reference_ids = tokenizers.Tokenizer.from_file(str(OLMOE_TOKENIZER)).encode(texts[2]).ids
    assert max(reference_ids) >= 512  # ids a small synthetic vocabulary would not have
    hand = run_alone(embedder, reference_ids).hidden_states[0, -1].numpy()
    got = embedder.encode(texts, "hs", prompt="none")[2]
    assert max_rel_error(got, hand) <= BATCH_TOL


def test_sentence_transformers_conventions(olmoe):
    """One str gives one vector; a numpy array of str works as a list; normalize_embeddings is normalize."""
    texts = TEXTS[:3]
    batch = olmoe.encode(texts, "moee-sum", batch_size=1)
    one = olmoe.encode(texts[1], "moee-sum")
    assert one.shape == (olmoe.dimension("moee-sum"),)
    assert max_rel_error(one, batch[1]) <= BATCH_TOL
    np.testing.assert_array_equal(olmoe.encode(np.array(texts), "moee-sum", batch_size=1), batch)
    unit = olmoe.encode(texts, "hs", normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(unit, olmoe.encode(texts, "hs", normalize=True))
    assert olmoe.get_sentence_embedding_dimension("rw") == olmoe.dimension("rw")
    assert olmoe.max_seq_length == olmoe.args.max_position_embeddings
    with pytest.raises(InputError, match="text at index 1 is int, not str"):
        olmoe.encode(np.array(["a", 1], dtype=object), "hs")


# --- sentence-transformers conventions: named prompts, output types, precision ---------------------


def test_named_prompts_prefixes_templates_and_names(olmoe):
    """prompts as sentence-transformers has them: a prefix becomes prefix + {text}; templates and built-in
    names are kept; encode_query/encode_document pick their entry, default_prompt_name applies otherwise."""
    texts = TEXTS[:3]
    named = MoEEmbedder(olmoe.model, olmoe.tokenizer, prompts={"query": "query: ", "passage": "prompteol", "t": "Q {text} ."},
                        default_prompt_name="t")
    assert np.array_equal(named.encode_query(texts, "hs"), olmoe.encode(texts, "hs", prompt="query: {text}"))
    assert np.array_equal(named.encode_document(texts, "hs"), olmoe.encode(texts, "hs", prompt="prompteol"))
    assert np.array_equal(named.encode(texts, "hs"), olmoe.encode(texts, "hs", prompt="Q {text} ."))
    assert np.array_equal(named.encode(texts, "hs", prompt="none"), olmoe.encode(texts, "hs"))  # prompt= wins over the default
    assert np.array_equal(olmoe.encode_query(texts, "hs"), olmoe.encode(texts, "hs"))  # no prompts: no prompt
    with pytest.raises(InputError, match=r"^give prompt or prompt_name, not both$"):
        named.encode(texts, "hs", prompt="none", prompt_name="query")
    with pytest.raises(InputError, match=r"^prompt_name 'document' is not in this embedder's prompts \(query, passage, t\); "):
        named.encode(texts, "hs", prompt_name="document")
    with pytest.raises(InputError, match=r"^default_prompt_name 'q' is not a key of prompts \(query\)$"):
        MoEEmbedder(olmoe.model, olmoe.tokenizer, prompts={"query": "query: "}, default_prompt_name="q")
    with pytest.raises(InputError, match=r"^prompts must map names to prompt strings"):
        MoEEmbedder(olmoe.model, olmoe.tokenizer, prompts=["query: "])


def test_truncate_dim_output_types_and_pairwise_similarity(olmoe):
    texts = TEXTS[:4]
    full = olmoe.encode(texts, "moee-concat")
    rw = olmoe.encode(texts, "rw")
    assert np.array_equal(olmoe.encode(texts, "rw", truncate_dim=10), rw[:, :10])
    unit = olmoe.encode(texts, "rw", truncate_dim=10, normalize_embeddings=True)  # truncated, then normalized
    assert np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-6) and np.allclose(unit, rw[:, :10] / np.linalg.norm(rw[:, :10], axis=1, keepdims=True))
    with pytest.raises(InputError, match=rf"^truncate_dim must be an integer in \[1, {rw.shape[1]}\] \(this kind's width\), got 0$"):
        olmoe.encode(texts, "rw", truncate_dim=0)
    tensor = olmoe.encode(texts, "moee-concat", convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and torch.equal(tensor, torch.from_numpy(full))
    rows = olmoe.encode(texts, "moee-concat", convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == 4 and all(torch.equal(r, torch.from_numpy(f)) for r, f in zip(rows, full))
    one = olmoe.encode(texts[0], "moee-concat", convert_to_tensor=True)
    assert one.shape == (full.shape[1],)
    assert olmoe.similarity_fn_name == "cosine"
    other = olmoe.encode(TEXTS[4:8], "moee-concat")
    pairwise = olmoe.similarity_pairwise(full, other)
    assert pairwise.shape == (4,) and np.allclose(pairwise, np.diag(olmoe.similarity(full, other)), atol=1e-6)


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_precision_as_sentence_transformers_quantizes(olmoe, precision):
    quantization = pytest.importorskip("sentence_transformers.util.quantization")
    texts = TEXTS[:6]
    full = olmoe.encode(texts, "moee-concat")  # 128 dimensions: whole bytes for the binary kinds
    ours = olmoe.encode(texts, "moee-concat", precision=precision)
    theirs = quantization.quantize_embeddings(full, precision=precision)
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


def test_bad_precision_is_refused_before_the_work(olmoe, monkeypatch):
    monkeypatch.setattr(type(olmoe), "features", lambda *a, **k: pytest.fail("ran the model"))
    with pytest.raises(InputError, match=r"^precision must be one of float32, int8, uint8, binary, ubinary \(or None: float32\), got 'float16'$"):
        olmoe.encode(TEXTS[:2], "hs", precision="float16")
    monkeypatch.undo()
    with pytest.raises(InputError, match=r"^precision='int8' scales each dimension by its range over the rows encoded "
                                         r"together; encode at least two texts at once$"):
        olmoe.encode(TEXTS[:1], "hs", precision="int8")
