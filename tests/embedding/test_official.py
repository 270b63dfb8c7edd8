"""encode_official: the authors' public code, point by point as official.py's docstring lists it.

Every expectation is rebuilt by hand from the tokenizer's ids and one direct
decoder call on a batch padded the authors' way (pad id 0 on the left,
positions 0..T-1). The hand batch is the very computation the embedder should
run, so features agree within 1e-6 relative and standardised vectors within
1e-5 relative (standardisation divides by small spreads).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from embed_fixtures import (  # noqa: F401  (fixtures are used by name)
    TEXTS,
    deepseek,
    embedders,
    max_rel_error,
    newer,
    olmoe,
    qwen,
    sample_std_standardize,
    single_thread,
)
from moee_ref.embedding.official import encode_official
from moee_ref.embedding.alpha import AlphaChoice
from moee_ref.embedding.embedder import KINDS
from moee_ref.errors import InputError
from moee_ref.embedding.official import OFFICIAL_BATCH_SIZE, OFFICIAL_RW_VALUES
from moee_ref.embedding.prompts import BUILTIN_PROMPTS, apply_official_prompt
from moee_ref.embedding.standardize import Standardizer

FAMILIES = ["olmoe", "qwen2_moe", "deepseek"]
FEATURE_TOL = 1e-6
STANDARDISED_TOL = 1e-5
# A quoted word, an empty text (kept empty, as theirs), a question (no "." appended), an underscore.
OFFICIAL_TEXTS = ['He said "hi" to me', "", "Where is the nearest station?", "snake_case names are fine"]


def hand_batch(embedder, texts, prompt="none", prefix=""):
    """(HS [B, D], RW [B, L*E], input_ids, attention_mask, position_ids) of one batch built the authors' way."""
    sequences = [embedder.tokenizer.encode(apply_official_prompt(prompt, text, prefix)) for text in texts]
    width = max(map(len, sequences))
    input_ids = torch.zeros(len(texts), width, dtype=torch.long)  # pad id 0
    mask = torch.zeros(len(texts), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence)
        mask[row, width - len(sequence) :] = 1
    positions = torch.arange(width).expand(len(texts), width)
    with torch.inference_mode():
        out = embedder.model(input_ids, mask, position_ids=positions)
    routing = out.router_logits if OFFICIAL_RW_VALUES[embedder.args.family] == "logits" else out.router_probs
    rw = routing[:, :, -1].reshape(len(texts), -1)
    return out.hidden_states[:, -1].numpy(), rw.numpy(), input_ids, mask, positions


def unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- 1. prompts ----------------------------------------------------------------------


def test_official_prompts_preprocess_and_wrap():
    assert apply_official_prompt("none", 'He said "hi" to me') == "\"He said 'hi' to me.\""
    assert apply_official_prompt("none", "") == '""'
    assert apply_official_prompt("none", "Where is it?") == '"Where is it?"'
    assert apply_official_prompt("none", "snake_case names") == '"snake case names."'
    assert apply_official_prompt("prompteol", "Cats sleep") == 'This sentence : "Cats sleep." means in one word:"'
    assert apply_official_prompt("PromptEOL", "  Cats sleep") == 'This sentence : "  Cats sleep." means in one word:"'
    assert apply_official_prompt("none", "  padded ") == '"  padded ."'
    assert apply_official_prompt("none", "  ") == '"  ."'


# --- 2. tokens, padding, positions -------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_batch_fed_to_the_model_is_the_authors_batch(embedders, family, monkeypatch):
    embedder = embedders[family]
    hs, _, input_ids, mask, positions = hand_batch(embedder, OFFICIAL_TEXTS, prompt="none")
    assert (mask == 0).any()  # the batch really is padded
    if family == "olmoe":
        assert embedder.tokenizer.pad_id == 1  # its own pad token is not 0: the official pad id is forced
    if family == "deepseek":
        assert bool((input_ids[mask.bool()].reshape(-1)[:1] == embedder.tokenizer.bos_id).all())

    calls = []
    forward = embedder.model.forward

    def spy(input_ids, attention_mask=None, **kwargs):
        calls.append((input_ids.clone(), attention_mask.clone(), kwargs["position_ids"].clone()))
        return forward(input_ids, attention_mask, **kwargs)

    monkeypatch.setitem(embedder.model.__dict__, "forward", spy)
    vectors = encode_official(embedder, OFFICIAL_TEXTS, "hs")
    monkeypatch.undo()

    assert len(calls) == 1
    fed_ids, fed_mask, fed_positions = calls[0]
    assert torch.equal(fed_ids, input_ids)
    assert torch.equal(fed_mask, mask)
    assert torch.equal(fed_positions, positions)
    # HS is the final normed state at the last position, not standardised
    assert vectors.dtype == np.float32
    assert max_rel_error(vectors, hs) <= FEATURE_TOL


def test_prompt_names_are_the_builtin_names_in_any_spelling(olmoe):
    texts = OFFICIAL_TEXTS[:3]
    canonical = encode_official(olmoe, texts, "hs", prompt="language_style")
    hs, *_ = hand_batch(olmoe, texts, prompt="language_style")
    assert max_rel_error(canonical, hs) <= FEATURE_TOL
    for spelling in ("Language Style", "language-style", "LANGUAGE_STYLE"):
        np.testing.assert_array_equal(encode_official(olmoe, texts, "hs", prompt=spelling), canonical)
    # no prompt means the authors' "none" (the text in double quotes), unlike the default mode
    np.testing.assert_array_equal(
        encode_official(olmoe, texts, "hs"), encode_official(olmoe, texts, "hs", prompt="none")
    )


# --- 3. RW values by family ---------------------------------------------------------------


@pytest.mark.parametrize("family, values", [("olmoe", "logits"), ("qwen2_moe", "logits"), ("deepseek", "probs")])
def test_rw_is_standardised_logits_or_probs_by_family(embedders, family, values):
    embedder = embedders[family]
    assert OFFICIAL_RW_VALUES[family] == values
    texts = TEXTS[:5]
    _, rw, input_ids, mask, positions = hand_batch(embedder, texts)
    got = encode_official(embedder, texts, "rw")
    assert got.shape == (5, embedder.dimension("rw"))
    assert max_rel_error(got, sample_std_standardize(rw)) <= STANDARDISED_TOL
    # the other router output gives other vectors: the choice is visible
    with torch.inference_mode():
        out = embedder.model(input_ids, mask, position_ids=positions)
    other = (out.router_probs if values == "logits" else out.router_logits)[:, :, -1].reshape(5, -1).numpy()
    assert np.abs(got - sample_std_standardize(other)).max() > 0.1


# --- 4. per-batch standardisation -----------------------------------------------------------


def test_rw_is_standardised_within_each_batch_of_the_given_size(olmoe):
    got = encode_official(olmoe, TEXTS, "rw", batch_size=4)
    for start in (0, 4):  # batches in input order
        _, rw, *_ = hand_batch(olmoe, TEXTS[start : start + 4])
        assert max_rel_error(got[start : start + 4], sample_std_standardize(rw)) <= STANDARDISED_TOL
        np.testing.assert_allclose(got[start : start + 4].mean(0), 0.0, atol=1e-5)
        np.testing.assert_allclose(got[start : start + 4].std(0, ddof=1), 1.0, atol=1e-4)


def test_official_vectors_depend_on_the_batch_and_default_ones_do_not(olmoe):
    for kind in ("rw", "moee-concat", "moee-sum"):
        by_two = encode_official(olmoe, TEXTS, kind, batch_size=2)
        by_four = encode_official(olmoe, TEXTS, kind, batch_size=4)
        assert np.abs(by_two - by_four).max() > 0.1, kind
        default_two = olmoe.encode(TEXTS, kind, batch_size=2)
        assert max_rel_error(default_two, olmoe.encode(TEXTS, kind, batch_size=4)) <= STANDARDISED_TOL


def test_default_batch_size_is_the_authors_evaluation_default_64(olmoe):
    assert OFFICIAL_BATCH_SIZE == 64 and olmoe.batch_size == 16
    texts = [f"{text} ({i})" for i, text in enumerate(TEXTS * 9)]  # 72 texts: batches of 64 + 8, or of 16
    default = encode_official(olmoe, texts, "rw")
    assert olmoe.last_report.batch_size == 64
    np.testing.assert_array_equal(default, encode_official(olmoe, texts, "rw", batch_size=64))
    assert np.abs(default - encode_official(olmoe, texts, "rw", batch_size=16)).max() > 0.1
    assert olmoe.last_report.batch_size == 16


# --- moee-concat and moee-sum -----------------------------------------------------------------


def test_moee_concat_standardises_the_whole_vector(olmoe):
    hs, rw, *_ = hand_batch(olmoe, TEXTS[:5])
    got = encode_official(olmoe, TEXTS[:5], "moee-concat")
    assert max_rel_error(got, sample_std_standardize(np.hstack([hs, rw]))) <= STANDARDISED_TOL


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_moee_sum_standardises_both_parts_then_weights_unit_vectors(olmoe, alpha):
    hs, rw, *_ = hand_batch(olmoe, TEXTS[:5])
    expected = np.hstack([unit_rows(sample_std_standardize(hs)), math.sqrt(alpha) * unit_rows(sample_std_standardize(rw))])
    got = encode_official(olmoe, TEXTS[:5], "moee-sum", alpha=alpha)
    np.testing.assert_allclose(got, expected, rtol=0, atol=STANDARDISED_TOL)
    np.testing.assert_allclose(np.linalg.norm(got.astype(np.float64), axis=1), math.sqrt(1 + alpha), atol=1e-6)
    assert olmoe.last_report.alpha == alpha
    unit = encode_official(olmoe, TEXTS[:5], "moee-sum", alpha=alpha, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit.astype(np.float64), axis=1), 1.0, atol=1e-6)


def test_hs_alone_is_not_standardised(olmoe):
    hs, *_ = hand_batch(olmoe, TEXTS[:5])
    got = encode_official(olmoe, TEXTS[:5], "hs")
    assert max_rel_error(got, hs) <= FEATURE_TOL
    assert np.abs(got.mean(0)).max() > 0.1  # standardised columns would have mean 0


# --- 5. NaN becomes zero ------------------------------------------------------------------------


def test_a_batch_of_one_has_no_spread_and_gives_zeros(olmoe):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the undefined std is handled, not warned about
        for kind in ("rw", "moee-concat", "moee-sum"):
            single = encode_official(olmoe, [TEXTS[0]], kind)
            np.testing.assert_array_equal(single, np.zeros((1, olmoe.dimension(kind)), np.float32))
            by_one = encode_official(olmoe, TEXTS[:3], kind, batch_size=1)
            np.testing.assert_array_equal(by_one, np.zeros((3, olmoe.dimension(kind)), np.float32))
        hs = encode_official(olmoe, [TEXTS[0]], "hs")
    hand, *_ = hand_batch(olmoe, [TEXTS[0]])
    assert max_rel_error(hs, hand) <= FEATURE_TOL
    # a normalised zero row stays zero rather than becoming NaN
    np.testing.assert_array_equal(encode_official(olmoe, [TEXTS[0]], "rw", normalize=True), 0.0)


def test_nan_in_a_feature_becomes_zero_in_every_kind(olmoe, monkeypatch):
    run_batch = olmoe.run_batch

    def poisoned(*args, **kwargs):  # a NaN in HS of the first row, as a bf16 overflow could give
        hs, rw = run_batch(*args, **kwargs)
        hs[0, :3] = np.nan
        return hs, rw

    clean = encode_official(olmoe, TEXTS[:4], "hs")
    monkeypatch.setitem(olmoe.__dict__, "run_batch", poisoned)
    got = encode_official(olmoe, TEXTS[:4], "hs")
    np.testing.assert_array_equal(got[0, :3], 0.0)
    np.testing.assert_array_equal(got[0, 3:], clean[0, 3:])
    np.testing.assert_array_equal(got[1:], clean[1:])
    for kind in ("moee-concat", "moee-sum"):
        assert np.all(np.isfinite(encode_official(olmoe, TEXTS[:4], kind))), kind


def test_a_constant_feature_within_a_batch_gives_zero_not_nan(olmoe):
    # the same text twice: every feature is constant, the sample std is 0 and (x - mean) / (0 + 1e-8) is 0
    twice = encode_official(olmoe, [TEXTS[0], TEXTS[0]], "rw")
    np.testing.assert_array_equal(twice, 0.0)


# --- 6. what official mode refuses ----------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"standardizer": Standardizer(mean=np.zeros(64), std=np.ones(64), kind="rw")},
        {"max_length": 32},
        {"truncation": "left"},
        {"pooling": "mean"},
        {"hs_layer": "mean"},
        {"rw_values": "probs"},
        {"rw_layers": [1]},
        {"allow_empty": True},
        {"alpha_pairs": (TEXTS[:3], TEXTS[3:6])},
    ],
    ids=lambda options: next(iter(options)),
)
def test_options_of_the_default_mode_are_refused(olmoe, options):
    with pytest.raises(
        InputError,
        match="mode='official' reproduces the authors' code and takes only kind, prompt, instruction, alpha, ensemble, "
        "batch_size, normalize and show_progress_bar; drop the other options",
    ):
        encode_official(olmoe, TEXTS[:3], "moee-sum", **options)


@pytest.mark.parametrize(
    "alpha",
    ["auto", AlphaChoice(alpha=1.0, score=1.0, criterion="hand-made"), -1.0, float("nan"), float("inf"), True, None],
    ids=["auto", "AlphaChoice", "negative", "nan", "inf", "bool", "None"],
)
def test_only_a_fixed_non_negative_alpha_is_taken(olmoe, alpha):
    with pytest.raises(InputError, match="mode='official' takes a fixed numeric alpha >= 0, as the authors' code does"):
        encode_official(olmoe, TEXTS[:3], "moee-sum", alpha=alpha)


@pytest.mark.parametrize("prompt", ["promptEOLL", BUILTIN_PROMPTS["prompteol"], "Say {text}", "", 5])
def test_only_the_authors_prompt_names_are_taken(olmoe, prompt):
    names = ", ".join(BUILTIN_PROMPTS)
    with pytest.raises(InputError, match=f"mode='official' takes one of the authors' prompt names \\({names}\\), got"):
        encode_official(olmoe, TEXTS[:3], "hs", prompt=prompt)


@pytest.mark.parametrize(
    "texts, kwargs, message",
    [
        ("a bare string", {}, "texts must be a list of strings"),
        (["fine", None], {}, "text at index 1 is NoneType, not str"),
        (TEXTS[:2], {"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        (TEXTS[:2], {"batch_size": 1.5}, "batch_size must be a positive integer, got 1.5"),
    ],
)
def test_bad_input_is_refused(olmoe, texts, kwargs, message):
    with pytest.raises(InputError, match=message):
        encode_official(olmoe, texts, "rw", **kwargs)
    with pytest.raises(InputError, match="kind='sum' is not valid; choose one of hs, rw, moee-concat, moee-sum"):
        encode_official(olmoe, TEXTS[:2], "sum")


@pytest.mark.parametrize("kind", KINDS)
def test_empty_list_gives_an_empty_matrix(olmoe, kind):
    vectors = encode_official(olmoe, [], kind)
    assert vectors.shape == (0, olmoe.dimension(kind)) and vectors.dtype == np.float32


def test_progress_bar_on_request(olmoe, capfd):
    encode_official(olmoe, TEXTS[:3], "rw", batch_size=1, show_progress_bar=True)
    assert "3/3" in capfd.readouterr().err
    encode_official(olmoe, TEXTS[:3], "rw", batch_size=1)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v2", "gpt_oss"])
def test_families_the_authors_code_does_not_cover_are_refused(family, tmp_path_factory):
    from embed_fixtures import build_embedder

    embedder = build_embedder(tmp_path_factory, family, seed=13)
    assert family not in OFFICIAL_RW_VALUES
    with pytest.raises(InputError, match=rf"^mode='official' reproduces the authors' code, which covers olmoe, qwen2_moe, "
                                         rf"deepseek only; {family} has no official numbers to match: use the default mode$"):
        encode_official(embedder, TEXTS, "moee-sum")
    assert embedder.encode(TEXTS, "moee-sum").shape == (len(TEXTS), embedder.dimension("moee-sum"))


# --- 7. the empty text, instructions, the unstandardised ensemble, similarity -----------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_empty_text_is_fed_as_the_authors_feed_it(embedders, family):
    embedder = embedders[family]
    texts = ["A first text.", "", "The third one"]
    hs, rw, *_ = hand_batch(embedder, texts, prompt="prompteol")
    assert apply_official_prompt("prompteol", "") == 'This sentence : "" means in one word:"'
    got = encode_official(embedder, texts, "hs", prompt="prompteol")
    assert max_rel_error(got, hs) <= FEATURE_TOL
    dot, *_ = hand_batch(embedder, ["A first text.", ".", "The third one"], prompt="prompteol")
    assert np.abs(got[1] - dot[1]).max() > 1e-3  # "." (what moee-ref fed before) is another input


def test_instructions_are_formatted_and_put_inside_the_template(olmoe):
    from moee_ref.embedding.official_tasks import instruction_prefix

    assert instruction_prefix(None) == ""
    assert instruction_prefix("") == "<|embed|>\n"
    assert instruction_prefix(" Retrieve semantically similar text.: \n") == "<|user|>\nRetrieve semantically similar text.\n<|embed|>\n"
    prefix = instruction_prefix("Say what_it means")
    # before the sentence, preprocessed with it ("." after an empty sentence), underscores become spaces
    assert apply_official_prompt("none", 'a "b"', prefix) == "\"<|user|>\nSay what it means\n<|embed|>\na 'b'\""
    assert apply_official_prompt("none", "", prefix) == '"<|user|>\nSay what it means\n<|embed|>\n."'
    texts = ["", *TEXTS[:3]]
    for instruction in ("Say what_it means", ""):
        hs, rw, *_ = hand_batch(olmoe, texts, prefix=instruction_prefix(instruction))
        got = encode_official(olmoe, texts, "rw", instruction=instruction)
        assert max_rel_error(got, sample_std_standardize(rw)) <= STANDARDISED_TOL
        assert max_rel_error(encode_official(olmoe, texts, "hs", instruction=instruction), hs) <= FEATURE_TOL
    with pytest.raises(InputError, match="^instruction must be a string or None, got int$"):
        encode_official(olmoe, texts, "hs", instruction=3)


def test_e5_instructions_by_task_and_side():
    from moee_ref.evaluation.mteb import PAPER_TASKS
    from moee_ref.embedding.official_tasks import e5_instruction

    for task in (t for group in PAPER_TASKS.values() for t in group):
        assert e5_instruction(task)  # every task of the paper has one
    assert e5_instruction("STS12") == e5_instruction("SICK-R") == "Retrieve semantically similar text."
    assert e5_instruction("SciFact", "query").startswith("Given a scientific claim")
    assert e5_instruction("SciFact", "document") == ""
    assert e5_instruction("CQADupstackGamingRetrieval", "query") == e5_instruction("CQADupstackRetrieval", "query")
    assert e5_instruction("SummEvalSummarization.v2") == e5_instruction("SummEval")
    with pytest.raises(InputError, match="^the authors' evaluation has no E5 instruction for MTEB task 'Banking77Classification'"):
        e5_instruction("Banking77Classification")


@pytest.mark.parametrize("alpha", [0.5, 3.0])
def test_the_unstandardised_ensemble_sums_raw_hs_and_rw(olmoe, alpha):
    hs, rw, *_ = hand_batch(olmoe, TEXTS[:5])
    got = encode_official(olmoe, TEXTS[:5], "moee-sum", alpha=alpha, ensemble="unstandardized")
    expected = np.hstack([unit_rows(hs), math.sqrt(alpha) * unit_rows(rw)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert np.abs(got - encode_official(olmoe, TEXTS[:5], "moee-sum", alpha=alpha)).max() > 0.1
    with pytest.raises(InputError, match="^ensemble='raw' is not valid; choose one of standardized, unstandardized$"):
        encode_official(olmoe, TEXTS[:5], "moee-sum", ensemble="raw")


def test_official_similarity_is_sklearns_paired_cosine_with_zero_vectors_as_theirs():
    from moee_ref.embedding.official import official_similarity

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    a[1] = 0.0
    b[1] = 0.0  # two zero vectors: 1.0
    a[2] = 0.0  # a zero vector against another: 0.5
    got = official_similarity(a, b, "rw", hidden_size=3)
    rows = [0, 3]
    cosine = (a[rows] * b[rows]).sum(1) / np.linalg.norm(a[rows], axis=1) / np.linalg.norm(b[rows], axis=1)
    np.testing.assert_allclose(got[rows], cosine, rtol=1e-12)
    assert got[1] == 1.0 and got[2] == 0.5
    pytest.importorskip("sklearn")
    from sklearn.metrics.pairwise import paired_cosine_distances

    np.testing.assert_allclose(got, 1 - paired_cosine_distances(a, b), rtol=1e-12)
    # moee-sum: the HS parts' score plus alpha times the RW parts'
    summed = official_similarity(a, b, "moee-sum", hidden_size=3, alpha=2.0)
    parts = (1 - paired_cosine_distances(a[:, :3], b[:, :3])) + 2.0 * (1 - paired_cosine_distances(a[:, 3:], b[:, 3:]))
    np.testing.assert_allclose(summed, parts, rtol=1e-12)


# --- 8. against the authors' encode() redone on transformers --------------------------------------------


def authors_encode(model, tokenizer, sentences, batch_size, instruction, template, emb_info, alpha=1.0):
    """Their MOEE.encode and STS scoring as their code does it, on transformers' model and tokenizer (written
    here from reading it): instruction glued on, split/join, the "." rule, quotes, template, "_", strip; padded
    by the tokenizer with pad id 0 on the left; HS and router logits at the last position; standardisation
    of each batch in torch; NaN as 0. Returns (embeddings, hs, rw) as their encode does."""
    all_emb, all_hs, all_rw = [], [], []
    for start in range(0, len(sentences), batch_size):
        prompts = []
        for sent in [instruction + s for s in sentences[start:start + batch_size]]:
            sent = " ".join(sent.split(" ")) if sent.split(" ") != [] else "."
            if len(sent) > 0 and sent[-1] not in ".?!\"'":
                sent += "."
            sent = sent.replace('"', "'")
            prompts.append(template.replace("*sent 0*", sent).replace("_", " ").strip())
        inputs = tokenizer(prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True, output_router_logits=True, use_cache=False)
        rows = inputs["input_ids"].shape
        hs = out.hidden_states[-1][:, -1, :]
        rw = torch.cat([logits.reshape(*rows, -1)[:, -1, :] for logits in out.router_logits], dim=1)
        emb = {"HS": hs, "RW": rw, "MoEE": torch.cat([hs, rw], dim=1)}[emb_info]
        if emb_info != "HS":  # (torch warns of the batch of one's undefined std; NaN becomes 0 below)
            # Their formula in float64, as moee-ref computes it: in float32 a feature whose two values in a batch
            # nearly coincide loses its digits to cancellation (2.5e-4 of a standardised value on an AVX2 CPU).
            emb, hs, rw = emb.double(), hs.double(), rw.double()
            emb = (emb - emb.mean(0, keepdim=True)) / (emb.std(0, keepdim=True) + 1e-8)
            hs = (hs - hs.mean(0, keepdim=True)) / (hs.std(0, keepdim=True) + 1e-8)
            rw = (rw - rw.mean(0, keepdim=True)) / (rw.std(0, keepdim=True) + 1e-8)
        all_emb.append(emb), all_hs.append(hs), all_rw.append(rw)
    return tuple(torch.nan_to_num(torch.cat(parts), nan=0.0, posinf=float("inf"), neginf=float("-inf")).numpy()
                 for parts in (all_emb, all_hs, all_rw))


@pytest.mark.filterwarnings("ignore:std\\(\\)")
@pytest.mark.parametrize("instruction", [None, "Retrieve semantically similar text."])
@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])  # transformers has both (DeepSeekMoE's RW are probabilities)
def test_the_vectors_and_scores_are_those_of_the_authors_pipeline_on_transformers(embedders, family, instruction):
    transformers = pytest.importorskip("transformers")
    sklearn_pairwise = pytest.importorskip("sklearn.metrics.pairwise")
    from moee_ref.embedding.official import official_similarity
    from moee_ref.embedding.official_tasks import instruction_prefix
    from moee_ref.evaluation.verify import load_reference

    embedder = embedders[family]
    source = embedder.model.source_dir
    model = load_reference(source, embedder.args)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token_id = 0
    tokenizer.padding_side = "left"
    first = ["", 'He said "hi" to me', "Where is the nearest station?", "snake_case names are fine", "A cat sleeps"]
    second = ["Someone is talking", "", "The station is near.", "names in snake case", "Dogs run"]
    template = 'This sentence : "*sent 0*" means in one word:"'
    settings = dict(prompt="prompteol", instruction=instruction, batch_size=2)  # 5 texts: the last batch is one text
    for kind, emb_info in (("hs", "HS"), ("rw", "RW"), ("moee-concat", "MoEE")):
        theirs, _, _ = authors_encode(model, tokenizer, first, 2, instruction_prefix(instruction), template, emb_info)
        ours = encode_official(embedder, first, kind, **settings)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 if kind != "hs" else 1e-6, err_msg=kind)
    np.testing.assert_array_equal(ours[4], 0.0)  # the batch of one

    # their similarity ensemble (emb_info MoEE, standardised parts; emb_info HS, raw parts) and its STS scores
    for ensemble, emb_info in (("standardized", "MoEE"), ("unstandardized", "HS")):
        _, hs1, rw1 = authors_encode(model, tokenizer, first, 2, instruction_prefix(instruction), template, emb_info)
        _, hs2, rw2 = authors_encode(model, tokenizer, second, 2, instruction_prefix(instruction), template, emb_info)
        paired = sklearn_pairwise.paired_cosine_distances
        theirs = (1 - paired(hs1, hs2)) + 0.5 * (1 - paired(rw1, rw2))
        a = encode_official(embedder, first, "moee-sum", alpha=0.5, ensemble=ensemble, **settings)
        b = encode_official(embedder, second, "moee-sum", alpha=0.5, ensemble=ensemble, **settings)
        ours = official_similarity(a, b, "moee-sum", embedder.args.hidden_size, alpha=0.5)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5, err_msg=ensemble)
        if ensemble == "standardized":  # the last pair's parts are zero on both sides: 1.0 + 0.5 * 1.0
            assert theirs[4] == ours[4] == 1.5
