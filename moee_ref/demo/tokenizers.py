"""Build small, deterministic byte-level BPE tokenizers offline, for tests and demos.

The tokenizers produced here mimic the three special-token conventions of the
MoE checkpoints moee-ref supports, without downloading anything:

* OLMoE-like:    no BOS, eos ``<|endoftext|>``, pad ``<|padding|>``.
* Qwen-like:     no BOS, ``<|endoftext|>`` is both eos and pad.
* DeepSeek-like: tokenizer_config.json asks for a BOS
  ``<｜begin▁of▁sentence｜>``; eos ``<｜end▁of▁sentence｜>``. Optionally the
  tokenizer.json post-processor adds the BOS itself too, which is what a
  loader must not double.

Pass a family's ``TOKENIZER_STYLE`` dict as keyword arguments to get that style::

    build_byte_level_tokenizer(512, tmp_dir, **families.deepseek.TOKENIZER_STYLE)

Only the ``tokenizers`` library is needed. Training on the built-in corpus
takes a few milliseconds and gives byte-identical files on every run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..errors import InputError
from ..families.deepseek import BOS as DEEPSEEK_BOS

__all__ = ["build_byte_level_tokenizer", "build_family_tokenizer"]

# Every byte gets a token of its own in a byte-level vocabulary.
BYTE_ALPHABET_SIZE = 256

# Varied English (with a little punctuation, digits and accents) so BPE finds
# plenty of merges. Kept fixed: changing it changes every synthetic vocabulary.
_TRAINING_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A mixture of experts routes each token to a few specialised feed-forward networks.",
    "The router picks the top experts by their gate scores and mixes their outputs.",
    "Hidden states from every layer can serve as sentence embeddings without fine-tuning.",
    "Routing weights carry information that complements the hidden states.",
    "She sold sea shells by the sea shore on a sunny Sunday morning.",
    "Researchers measured how well the embeddings cluster similar sentences together.",
    "In 1969, astronauts walked on the Moon and returned safely to Earth.",
    "The library opens at nine o'clock and closes at half past five.",
    "Please remember to water the plants while I am away on holiday.",
    "Machine learning models learn patterns from large amounts of data.",
    "The café on the corner serves excellent coffee and fresh croissants.",
    "Rain is expected tomorrow, so bring an umbrella and a warm jacket.",
    "Every language model splits text into tokens before it reads it.",
    "Byte-level tokenizers never meet an unknown character.",
    "The committee approved the budget after a long and heated discussion.",
    "Children were playing football in the park until the sun went down.",
    "Mathematics describes the world with numbers, shapes and equations.",
    "He wrote three letters, posted two of them and forgot the third.",
    "The train to the city leaves every fifteen minutes during the week.",
    "Good documentation explains what the code does and why it does it.",
    "Cats sleep for most of the day and hunt for most of the night.",
    "The museum displays paintings, sculptures and ancient manuscripts.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Our team shipped the new release on Friday after thorough testing.",
    "Where is the nearest station? Turn left, then walk straight ahead.",
    "Semantic similarity compares the meaning of two sentences, not their words.",
    "The orchestra played a symphony that lasted nearly two hours.",
    "Fresh bread, cheese and olives made a simple but delicious lunch.",
    "Students asked questions about the experiment and its surprising results.",
    "Mountains, rivers and forests cover most of the northern region.",
    "The weather was cold, but the people at the festival were cheerful.",
    "Sorting a list of numbers is one of the first algorithms people learn.",
    "Naïve approaches often work surprisingly well as a first baseline.",
    "Her garden is full of roses, tulips, daisies and sunflowers.",
    "The doctor recommended more sleep, less sugar and a daily walk.",
    "Old photographs remind us of places and people we have almost forgotten.",
    "A good night's sleep improves memory, mood and concentration.",
    "Prices rose by 3.5 percent last year, according to the report.",
    "The bridge was closed for repairs, so traffic moved slowly.",
)


def _token_entry(token: str, as_dict: bool) -> Union[str, dict]:
    """A special token the way tokenizer_config.json writes it: a string or an AddedToken dict."""
    if not as_dict:
        return token
    return {
        "__type": "AddedToken",
        "content": token,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def build_byte_level_tokenizer(
    vocab_size: int,
    path_dir: Union[str, Path],
    *,
    bos: Union[bool, str] = False,
    add_bos_token: bool = False,
    eos_token: str = "<|endoftext|>",
    add_eos_token: bool = False,
    pad_token: Union[str, None] = "<|padding|>",
    post_processor_adds_bos: bool = False,
    tokens_as_dicts: bool = False,
    model_max_length: int = 2048,
) -> Path:
    """Train a byte-level BPE of at most ``vocab_size`` tokens and write it to ``path_dir``.

    The built-in corpus yields exactly ``vocab_size`` tokens up to about 1100;
    beyond that the vocabulary stops growing when merges run out.

    Writes ``tokenizer.json`` and ``tokenizer_config.json`` (creating
    ``path_dir`` if needed) and returns ``path_dir`` as a Path.

    ``bos``: False for no BOS token, True for DeepSeek's BOS string, or the BOS
    string itself. ``add_bos_token``/``add_eos_token`` go to
    tokenizer_config.json. ``pad_token=None`` leaves the pad token out of the
    config (a loader then falls back to eos). ``post_processor_adds_bos`` makes
    tokenizer.json add the BOS itself through a TemplateProcessing.
    """
    bos_token = DEEPSEEK_BOS if bos is True else (bos or None)
    if bos_token is not None and not isinstance(bos_token, str):
        raise InputError(f"bos must be True, False or a token string, got {bos!r}")
    if not isinstance(eos_token, str) or not eos_token:
        raise InputError(f"eos_token must be a non-empty string, got {eos_token!r}")
    if pad_token is not None and (not isinstance(pad_token, str) or not pad_token):
        raise InputError(f"pad_token must be a non-empty string or None, got {pad_token!r}")
    if (add_bos_token or post_processor_adds_bos) and bos_token is None:
        raise InputError(
            "add_bos_token/post_processor_adds_bos need a BOS token; pass bos=True or bos='<token>'"
        )

    # Fixed order (duplicates dropped) so special-token ids are the same every run.
    special_tokens = list(dict.fromkeys(t for t in (eos_token, pad_token, bos_token) if t is not None))
    smallest_vocab = BYTE_ALPHABET_SIZE + len(special_tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest_vocab:
        raise InputError(
            f"vocab_size={vocab_size!r} is too small for a byte-level tokenizer: it needs at least "
            f"{BYTE_ALPHABET_SIZE} byte tokens + {len(special_tokens)} special tokens = {smallest_vocab}; "
            f"pass vocab_size >= {smallest_vocab}"
        )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_SENTENCES, trainer=trainer)

    byte_level = processors.ByteLevel(trim_offsets=True)
    if post_processor_adds_bos:
        bos_id = tokenizer.token_to_id(bos_token)
        add_bos = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B:1",
            special_tokens=[(bos_token, bos_id)],
        )
        tokenizer.post_processor = processors.Sequence([byte_level, add_bos])
    else:
        tokenizer.post_processor = byte_level

    out_dir = Path(path_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)

    config = {
        "add_bos_token": bool(add_bos_token),
        "add_eos_token": bool(add_eos_token),
        "bos_token": None if bos_token is None else _token_entry(bos_token, tokens_as_dicts),
        "eos_token": _token_entry(eos_token, tokens_as_dicts),
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    if pad_token is not None:
        config["pad_token"] = _token_entry(pad_token, tokens_as_dicts)
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")
    return out_dir


def build_family_tokenizer(style: dict, model_vocab_size: int, path_dir) -> Path:
    """A tokenizer with a family's special-token conventions (its TOKENIZER_STYLE) that fits a model of model_vocab_size."""
    vocab = min(model_vocab_size, 1024)
    return build_byte_level_tokenizer(vocab, path_dir, **style)
