"""Tests of moee_ref.loading.tokenizer (and the synthetic tokenizers used to exercise it)."""

import json
import re
import shutil
import time
import unicodedata
from pathlib import Path

import pytest
import tokenizers
import torch

from moee_ref.errors import CheckpointError, ConfigError, InputError
from moee_ref.demo.tokenizers import build_byte_level_tokenizer
from moee_ref.families import deepseek, olmoe, qwen2_moe

DEEPSEEK_BOS, DEEPSEEK_EOS = deepseek.BOS, deepseek.EOS
DEEPSEEK_STYLE, OLMOE_STYLE, QWEN_STYLE = deepseek.TOKENIZER_STYLE, olmoe.TOKENIZER_STYLE, qwen2_moe.TOKENIZER_STYLE
from moee_ref.loading.tokenizer import Batch, Tokenizer

OLMOE_TOKENIZER = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "olmoe-tokenizer.json"
OLMOE_PAD_ID = 1
OLMOE_EOS_ID = 50279
OLMOE_VOCAB_SIZE = 50280

SYNTHETIC_VOCAB = 600
LONG_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."


# ------------------------------------------------------------------- fixtures


def _olmoe_dir(tmp_path: Path, bos_token) -> Path:
    """A copy of the real OLMoE tokenizer.json with a tokenizer_config.json like the hub repo's."""
    if not OLMOE_TOKENIZER.is_file():
        pytest.skip(f"real OLMoE tokenizer not found at {OLMOE_TOKENIZER}")
    directory = tmp_path / "olmoe"
    directory.mkdir()
    shutil.copy(OLMOE_TOKENIZER, directory / "tokenizer.json")
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": bos_token,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|padding|>",
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "GPTNeoXTokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.fixture(params=[None, "<|endoftext|>"], ids=["bos-null", "bos-endoftext"])
def olmoe_dir(request, tmp_path):
    return _olmoe_dir(tmp_path, request.param)


@pytest.fixture
def olmoe(olmoe_dir):
    return Tokenizer.from_dir(olmoe_dir)


def _synthetic(tmp_path: Path, name: str, **options) -> Tokenizer:
    return Tokenizer.from_dir(build_byte_level_tokenizer(SYNTHETIC_VOCAB, tmp_path / name, **options))


@pytest.fixture
def olmoe_like(tmp_path):
    return _synthetic(tmp_path, "olmoe_like", **OLMOE_STYLE)


@pytest.fixture
def deepseek_config_bos(tmp_path):
    """BOS requested by tokenizer_config.json only."""
    return _synthetic(tmp_path, "deepseek_config", **DEEPSEEK_STYLE)


@pytest.fixture
def deepseek_postprocessor_bos(tmp_path):
    """BOS requested by tokenizer_config.json AND added by the tokenizer.json post-processor."""
    return _synthetic(tmp_path, "deepseek_post", **DEEPSEEK_STYLE, post_processor_adds_bos=True)


# ------------------------------------------------------------ real OLMoE tokenizer


def test_olmoe_special_ids(olmoe, olmoe_dir):
    assert olmoe.pad_id == OLMOE_PAD_ID
    assert olmoe.eos_id == OLMOE_EOS_ID
    assert olmoe.vocab_size == OLMOE_VOCAB_SIZE
    assert olmoe.token_to_id("<|padding|>") == OLMOE_PAD_ID
    assert olmoe.token_to_id("<|endoftext|>") == OLMOE_EOS_ID
    assert olmoe.token_to_id("no-such-token-anywhere") is None
    assert olmoe.adds_bos is False and olmoe.adds_eos is False
    # The hub sentinel 1e30 means "no limit".
    assert olmoe.model_max_length is None
    config = json.loads((olmoe_dir / "tokenizer_config.json").read_text())
    assert olmoe.bos_id == (None if config["bos_token"] is None else OLMOE_EOS_ID)


def test_olmoe_adds_no_bos_or_eos(olmoe):
    ids = olmoe.encode("Hello world")
    assert ids == [12092, 1533]
    assert ids == olmoe.encode("Hello world", add_special_tokens=False)
    assert OLMOE_EOS_ID not in ids


def test_olmoe_left_padding_and_mask(olmoe):
    batch = olmoe.encode_batch(["Hello world, this is a longer sentence.", "Hi"])
    assert isinstance(batch, Batch)
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
    short = olmoe.encode("Hi")
    long = olmoe.encode("Hello world, this is a longer sentence.")
    assert batch.lengths == [len(long), len(short)]
    assert batch.input_ids.shape == (2, len(long))
    assert batch.input_ids[0].tolist() == long
    pad_count = len(long) - len(short)
    assert batch.input_ids[1].tolist() == [OLMOE_PAD_ID] * pad_count + short
    assert batch.attention_mask[0].tolist() == [1] * len(long)
    assert batch.attention_mask[1].tolist() == [0] * pad_count + [1] * len(short)
    assert batch.attention_mask.sum(dim=1).tolist() == batch.lengths
    assert batch.num_truncated == 0


def test_olmoe_right_padding(olmoe):
    batch = olmoe.encode_batch(["Hello world, this is longer.", "Hi"], padding_side="right")
    short = olmoe.encode("Hi")
    pad_count = batch.input_ids.shape[1] - len(short)
    assert pad_count > 0
    assert batch.input_ids[1].tolist() == short + [OLMOE_PAD_ID] * pad_count
    assert batch.attention_mask[1].tolist() == [1] * len(short) + [0] * pad_count


def test_olmoe_round_trip_decode(olmoe):
    for text in ["Hello world", "  leading spaces and trailing  ", "naïve café — 東京 🚀", "line\nbreak\ttab"]:
        assert olmoe.decode(olmoe.encode(text)) == text
    assert olmoe.decode(torch.tensor(olmoe.encode("tensor input"))) == "tensor input"


def test_olmoe_nfc_normalization(olmoe):
    composed = "caf\u00e9"
    decomposed = "cafe\u0301"
    assert composed != decomposed and unicodedata.normalize("NFC", decomposed) == composed
    assert olmoe.encode(composed) == olmoe.encode(decomposed)
    batch = olmoe.encode_batch([composed, decomposed])
    assert torch.equal(batch.input_ids[0], batch.input_ids[1])


def test_olmoe_truncation_right_keeps_beginning(olmoe):
    full = olmoe.encode(LONG_TEXT)
    assert len(full) > 5
    batch = olmoe.encode_batch([LONG_TEXT, "Hi", LONG_TEXT], max_length=5)
    assert batch.num_truncated == 2
    assert batch.input_ids.shape == (3, 5)
    assert batch.input_ids[0].tolist() == full[:5]
    assert batch.input_ids[2].tolist() == full[:5]
    assert batch.lengths == [5, len(olmoe.encode("Hi")), 5]


def test_olmoe_truncation_left_keeps_end(olmoe):
    full = olmoe.encode(LONG_TEXT)
    batch = olmoe.encode_batch([LONG_TEXT, "Hi"], max_length=4, truncation_side="left")
    assert batch.num_truncated == 1
    assert batch.input_ids[0].tolist() == full[-4:]


def test_olmoe_no_truncation_without_max_length(olmoe):
    long_text = LONG_TEXT * 40
    batch = olmoe.encode_batch([long_text])
    assert batch.num_truncated == 0
    assert batch.input_ids.shape[1] == len(olmoe.encode(long_text)) > 500


def test_olmoe_matches_transformers(olmoe_dir):
    """transformers (test-only dependency) as an independent oracle for the ids."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(olmoe_dir))
    ours = Tokenizer.from_dir(olmoe_dir)
    texts = ["Hello world", "naïve cafe\u0301 — 東京 🚀", " spaces  inside ", "x" * 300, "<|endoftext|> literal"]
    for text in texts:
        assert ours.encode(text) == reference(text)["input_ids"], text


def test_backend_padding_and_truncation_are_ignored(tmp_path):
    """A tokenizer.json shipping its own padding/truncation must not change our explicit behaviour."""
    directory = build_byte_level_tokenizer(SYNTHETIC_VOCAB, tmp_path / "stateful", **OLMOE_STYLE)
    backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    backend.enable_truncation(max_length=2)
    backend.enable_padding(length=50, pad_id=7)
    backend.save(str(directory / "tokenizer.json"))
    tokenizer = Tokenizer.from_dir(directory)
    ids = tokenizer.encode(LONG_TEXT)
    assert len(ids) > 2 and 7 not in ids[-3:]
    # The caller's backend object keeps its own settings (we work on a copy).
    Tokenizer(backend, eos_token="<|endoftext|>")
    assert backend.truncation is not None and backend.padding is not None


# ------------------------------------------------------------ BOS / EOS handling


def test_deepseek_bos_added_once_from_config(deepseek_config_bos):
    tokenizer = deepseek_config_bos
    bos = tokenizer.token_to_id(DEEPSEEK_BOS)
    assert tokenizer.bos_id == bos and tokenizer.adds_bos and not tokenizer.adds_eos
    assert tokenizer.eos_id == tokenizer.token_to_id(DEEPSEEK_EOS)
    body = tokenizer.encode("Hello world", add_special_tokens=False)
    assert bos not in body
    assert tokenizer.encode("Hello world") == [bos] + body


def test_deepseek_bos_added_once_when_post_processor_adds_it(deepseek_postprocessor_bos, deepseek_config_bos, tmp_path):
    tokenizer = deepseek_postprocessor_bos
    bos = tokenizer.bos_id
    # The raw file really adds the BOS itself, so the config's add_bos_token would double it.
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "deepseek_post" / "tokenizer.json"))
    assert raw.encode("Hello world").ids[0] == bos
    ids = tokenizer.encode("Hello world")
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids == deepseek_config_bos.encode("Hello world")
    assert tokenizer.encode("Hello world", add_special_tokens=False) == ids[1:]


def test_post_processor_bos_detected_without_config_flag(tmp_path):
    tokenizer = _synthetic(tmp_path, "post_only", **dict(DEEPSEEK_STYLE, add_bos_token=False),
                           post_processor_adds_bos=True)
    assert tokenizer.adds_bos
    assert tokenizer.encode("Hi")[0] == tokenizer.bos_id


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("fixture_name", ["deepseek_config_bos", "deepseek_postprocessor_bos"])
def test_bos_stays_first_after_truncation(request, fixture_name, side):
    tokenizer = request.getfixturevalue(fixture_name)
    body = tokenizer.encode(LONG_TEXT, add_special_tokens=False)
    batch = tokenizer.encode_batch([LONG_TEXT], max_length=4, truncation_side=side)
    kept = body[:3] if side == "right" else body[-3:]
    assert batch.input_ids[0].tolist() == [tokenizer.bos_id] + kept
    assert batch.num_truncated == 1


def test_add_eos_token_honoured(tmp_path):
    tokenizer = _synthetic(tmp_path, "eos", **dict(DEEPSEEK_STYLE, add_eos_token=True))
    assert tokenizer.adds_eos
    body = tokenizer.encode(LONG_TEXT, add_special_tokens=False)
    assert tokenizer.encode(LONG_TEXT) == [tokenizer.bos_id] + body + [tokenizer.eos_id]
    truncated = tokenizer.encode_batch([LONG_TEXT], max_length=5, truncation_side="left")
    assert truncated.input_ids[0].tolist() == [tokenizer.bos_id] + body[-3:] + [tokenizer.eos_id]
    with pytest.raises(InputError, match=r"max_length=2 leaves no room .* use max_length >= 3"):
        tokenizer.encode_batch(["x"], max_length=2)


def test_special_tokens_as_added_token_dicts_are_read(tmp_path):
    directory = build_byte_level_tokenizer(SYNTHETIC_VOCAB, tmp_path / "dicts", **DEEPSEEK_STYLE)
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert isinstance(config["bos_token"], dict)
    tokenizer = Tokenizer.from_dir(directory)
    assert tokenizer.bos_id == tokenizer.token_to_id(DEEPSEEK_BOS) is not None


def test_empty_text_with_bos_is_just_bos(deepseek_config_bos):
    batch = deepseek_config_bos.encode_batch(["", "Hello"])
    assert batch.lengths[0] == 1
    assert batch.input_ids[0, -1].item() == deepseek_config_bos.bos_id


def test_empty_text_without_bos_is_an_error(olmoe_like):
    with pytest.raises(InputError, match=r"text at index 1 encodes to no tokens"):
        olmoe_like.encode_batch(["fine", ""])


def test_no_special_tokens_when_disabled(deepseek_postprocessor_bos):
    batch = deepseek_postprocessor_bos.encode_batch(["Hello"], add_special_tokens=False, max_length=1)
    assert deepseek_postprocessor_bos.bos_id not in batch.input_ids[0].tolist()
    assert batch.input_ids.shape == (1, 1)


# ------------------------------------------------------------------- pad token


def test_qwen_like_pad_is_eos(tmp_path):
    tokenizer = _synthetic(tmp_path, "qwen", **QWEN_STYLE)
    assert tokenizer.pad_id == tokenizer.eos_id == tokenizer.token_to_id("<|endoftext|>")
    assert tokenizer.bos_id is None and not tokenizer.adds_bos
    batch = tokenizer.encode_batch(["a longer sentence here", "a"])
    assert batch.input_ids[1, 0].item() == tokenizer.eos_id


def test_pad_falls_back_to_eos(tmp_path):
    tokenizer = _synthetic(tmp_path, "nopad", **dict(OLMOE_STYLE, pad_token=None))
    assert tokenizer.pad_id == tokenizer.eos_id == tokenizer.token_to_id("<|endoftext|>")


def test_pad_id_override(tmp_path, olmoe_like):
    directory = build_byte_level_tokenizer(SYNTHETIC_VOCAB, tmp_path / "override", **OLMOE_STYLE)
    tokenizer = Tokenizer.from_dir(directory, pad_id=0)
    assert olmoe_like.pad_id != 0 and tokenizer.pad_id == 0
    batch = tokenizer.encode_batch(["a longer sentence here", "a"])
    assert batch.input_ids[1, 0].item() == 0
    with pytest.raises(InputError, match=r"pad_id must be an integer in \[0, 600\)"):
        Tokenizer.from_dir(directory, pad_id=SYNTHETIC_VOCAB)


def test_missing_pad_and_eos_errors_only_when_padding_needed(tmp_path):
    directory = build_byte_level_tokenizer(SYNTHETIC_VOCAB, tmp_path / "bare", **OLMOE_STYLE)
    tokenizer = Tokenizer.from_file(directory / "tokenizer.json")  # no config at all
    assert tokenizer.pad_id is None and tokenizer.eos_id is None
    same_length = tokenizer.encode_batch(["a", "b"])
    assert same_length.input_ids.shape == (2, 1)
    with pytest.raises(ConfigError, match=r"needs padding .* pass pad_id="):
        tokenizer.encode_batch(["a longer text", "b"])


def test_special_tokens_map_fills_unset_tokens(tmp_path):
    directory = build_byte_level_tokenizer(SYNTHETIC_VOCAB, tmp_path / "map", **OLMOE_STYLE)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    del config["pad_token"]
    config["eos_token"] = None
    config_path.write_text(json.dumps(config), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": "<|endoftext|>"}, "pad_token": "<|padding|>"}), encoding="utf-8"
    )
    tokenizer = Tokenizer.from_dir(directory)
    assert tokenizer.eos_id == tokenizer.token_to_id("<|endoftext|>")
    assert tokenizer.pad_id == tokenizer.token_to_id("<|padding|>")


# ----------------------------------------------------------------- bad inputs


def test_bare_string_is_rejected(olmoe_like):
    with pytest.raises(InputError, match=r"got a single str; pass \[text\] instead"):
        olmoe_like.encode_batch("Hello")


@pytest.mark.parametrize("texts", [iter(["a"]), {"a"}, None], ids=["iterator", "set", "none"])
def test_non_sequence_texts_are_rejected(olmoe_like, texts):
    with pytest.raises(InputError, match=r"texts must be a list or tuple of strings"):
        olmoe_like.encode_batch(texts)


@pytest.mark.parametrize("bad_item, type_name", [(None, "NoneType"), (3, "int"), (b"bytes", "bytes")])
def test_non_string_item_names_its_index(olmoe_like, bad_item, type_name):
    with pytest.raises(InputError, match=rf"text at index 2 is {type_name}, not str"):
        olmoe_like.encode_batch(["a", "b", bad_item])


def test_invalid_unicode_names_its_index(olmoe_like):
    with pytest.raises(InputError, match=r"text at index 1 is not valid Unicode"):
        olmoe_like.encode_batch(["fine", "bad \ud800 surrogate"])


@pytest.mark.parametrize("max_length", [0, -3, 2.5, True])
def test_bad_max_length(olmoe_like, max_length):
    with pytest.raises(InputError, match=r"max_length must be a positive integer"):
        olmoe_like.encode_batch(["Hello"], max_length=max_length)


def test_max_length_must_leave_room_after_bos(deepseek_config_bos):
    with pytest.raises(InputError, match=r"max_length=1 leaves no room for text after the 1 special"):
        deepseek_config_bos.encode_batch(["Hello"], max_length=1)


def test_bad_truncation_side(olmoe_like):
    with pytest.raises(InputError, match=r"truncation_side must be one of \('right', 'left'\), got 'middle'"):
        olmoe_like.encode_batch(["Hello"], max_length=3, truncation_side="middle")


def test_bad_padding_side(olmoe_like):
    with pytest.raises(InputError, match=r"padding_side must be one of \('left', 'right'\), got 'top'"):
        olmoe_like.encode_batch(["Hello"], padding_side="top")


def test_empty_batch(olmoe_like):
    batch = olmoe_like.encode_batch([])
    assert batch.input_ids.shape == (0, 0) and batch.attention_mask.shape == (0, 0)
    assert batch.input_ids.dtype == torch.long
    assert batch.lengths == [] and batch.num_truncated == 0


def test_decode_rejects_bad_ids(olmoe_like):
    with pytest.raises(InputError, match=r"id at index 1 is 600, not a token id"):
        olmoe_like.decode([5, SYNTHETIC_VOCAB])
    with pytest.raises(InputError, match=r"1-D sequence"):
        olmoe_like.decode(torch.zeros((2, 2), dtype=torch.long))


# ------------------------------------------------------------ bad checkpoint files


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CheckpointError, match=rf"no tokenizer\.json in {re.escape(str(tmp_path))}"):
        Tokenizer.from_dir(tmp_path)


def test_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=r"nowhere does not exist"):
        Tokenizer.from_dir(missing)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json does not exist"):
        Tokenizer.from_file(missing / "tokenizer.json")


@pytest.mark.parametrize("content", ["{not json", '{"model": 42}', ""], ids=["syntax", "schema", "empty"])
def test_corrupt_tokenizer_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a valid tokenizers file .* re-download"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_tokenizer_config(tmp_path):
    directory = build_byte_level_tokenizer(SYNTHETIC_VOCAB, tmp_path / "badconfig", **OLMOE_STYLE)
    (directory / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>",', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer.from_dir(directory)


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"add_bos_token": "yes"}, r"add_bos_token must be true, false or null"),
        ({"eos_token": 5}, r"eos_token must be a string, null or an object"),
        ({"model_max_length": -1}, r"model_max_length must be a positive integer"),
        ({"add_eos_token": True, "eos_token": None}, r"add_eos_token is true but no eos_token"),
    ],
)
def test_invalid_config_values(tmp_path, change, pattern):
    directory = build_byte_level_tokenizer(SYNTHETIC_VOCAB, tmp_path / "values", **OLMOE_STYLE)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(change)
    config_path.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ConfigError, match=pattern):
        Tokenizer.from_dir(directory)


def test_config_token_missing_from_vocab(tmp_path):
    directory = build_byte_level_tokenizer(SYNTHETIC_VOCAB, tmp_path / "mismatch", **OLMOE_STYLE)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["pad_token"] = "<pad-not-in-vocab>"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"pad_token '<pad-not-in-vocab>' is not in the tokenizer vocabulary"):
        Tokenizer.from_dir(directory)


# ------------------------------------------------------------ synthetic builder


def test_synthetic_build_is_deterministic_and_quick(tmp_path):
    start = time.perf_counter()
    first = build_byte_level_tokenizer(SYNTHETIC_VOCAB, tmp_path / "one", **DEEPSEEK_STYLE)
    assert time.perf_counter() - start < 1.0
    second = build_byte_level_tokenizer(SYNTHETIC_VOCAB, tmp_path / "two", **DEEPSEEK_STYLE)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


@pytest.mark.parametrize("vocab_size", [258, 600, 1000])
def test_synthetic_vocab_size(tmp_path, vocab_size):
    tokenizer = Tokenizer.from_dir(build_byte_level_tokenizer(vocab_size, tmp_path / "v", **OLMOE_STYLE))
    assert tokenizer.vocab_size == vocab_size
    # Byte level: any text, even unseen scripts, round-trips.
    assert tokenizer.decode(tokenizer.encode("Zürich 東京 🚀")) == "Zürich 東京 🚀"


def test_synthetic_vocab_too_small(tmp_path):
    with pytest.raises(InputError, match=r"vocab_size=257 is too small .* pass vocab_size >= 258"):
        build_byte_level_tokenizer(257, tmp_path / "small", **DEEPSEEK_STYLE)


def test_synthetic_bos_options_need_a_bos(tmp_path):
    with pytest.raises(InputError, match=r"need a BOS token; pass bos=True"):
        build_byte_level_tokenizer(SYNTHETIC_VOCAB, tmp_path / "nobos", add_bos_token=True)


def test_bos_true_means_deepseeks_bos(tmp_path):
    from moee_ref.demo.tokenizers import build_byte_level_tokenizer

    directory = build_byte_level_tokenizer(512, tmp_path / "tok", bos=True, add_bos_token=True)
    tokenizer = Tokenizer.from_dir(directory)
    assert tokenizer.bos_id == tokenizer.token_to_id(DEEPSEEK_BOS) is not None
