"""Text to token ids for moee-ref, on top of the `tokenizers` library only.

A checkpoint's ``tokenizer.json`` holds the normalizer, the BPE model and a
post-processor; ``tokenizer_config.json`` (a transformers file) adds the
special-token conventions: which tokens are BOS/EOS/pad and whether BOS/EOS
are added. This module reads both without transformers and makes every step
explicit: special tokens, truncation and padding are done here, never by the
`tokenizers` library's own (stateful) padding and truncation settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import tokenizers
import torch

from ..errors import CheckpointError, ConfigError, InputError

PathLike = Union[str, Path]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

TRUNCATION_SIDES = ("right", "left")
PADDING_SIDES = ("left", "right")

# transformers writes a huge sentinel (int(1e30)) as model_max_length when a
# model has no limit; anything this large means "no limit".
_NO_LIMIT_THRESHOLD = 10**12

# Encoded with and without special tokens to see what the post-processor adds.
_PROBE_TEXT = "Hello world"


@dataclass
class Batch:
    """A padded batch of token ids.

    ``input_ids`` and ``attention_mask`` are torch.long tensors of shape [B, T]
    (the mask is 1 on real tokens, 0 on padding); ``lengths`` holds each row's
    number of real tokens and ``num_truncated`` how many texts were cut to
    max_length.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]
    num_truncated: int


def _read_json(path: Path, error_type: type, what: str):
    """Parse a JSON file, turning read and parse failures into ``error_type``."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise error_type(
            f"{what} {path} is not valid JSON ({exc}); fix or re-download the file"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise error_type(f"cannot read {what} {path} ({exc}); check the file and its permissions") from exc


def _token_string(value, key: str, source: Path) -> Optional[str]:
    """A special token from a config: a plain string, an AddedToken dict {"content": ...}, or None."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"] or None
    raise ConfigError(
        f"{source}: {key} must be a string, null or an object with a string 'content', got {value!r}; "
        f"fix the file"
    )


def _optional_bool(config: dict, key: str, source: Optional[Path]) -> bool:
    value = config.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true, false or null, got {value!r}; fix the file")
    return value


def _model_max_length(config: dict, source: Optional[Path]) -> Optional[int]:
    value = config.get("model_max_length")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
        raise ConfigError(
            f"{source}: model_max_length must be a positive integer or null, got {value!r}; fix the file"
        )
    if value >= _NO_LIMIT_THRESHOLD:
        return None
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{source}: model_max_length must be an integer, got {value!r}; fix the file")
    return int(value)


class Tokenizer:
    """Byte-level (or any `tokenizers`) tokenizer with explicit special tokens, truncation and padding.

    Attributes: ``bos_id``, ``eos_id``, ``pad_id`` (each an int or None),
    ``adds_bos``/``adds_eos`` (whether encoding with special tokens puts a BOS
    first / an EOS last, whoever adds it) and ``model_max_length`` (None when
    the config sets no limit).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: Optional[str] = None,
        eos_token: Optional[str] = None,
        pad_token: Optional[str] = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        model_max_length: Optional[int] = None,
        pad_id: Optional[int] = None,
        source: str = "tokenizer",
    ):
        """Wrap ``backend`` (copied, so the caller's object keeps its settings).

        The token strings must exist in the vocabulary. ``pad_id`` overrides the
        pad token (the authors' official code pads with id 0). ``source`` names
        where the tokenizer came from, for error messages.
        """
        if not isinstance(backend, tokenizers.Tokenizer):
            raise InputError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        # A private copy whose built-in padding/truncation are off: this class
        # pads and truncates itself so the behaviour is visible and testable.
        self._backend = tokenizers.Tokenizer.from_str(backend.to_str())
        self._backend.no_padding()
        self._backend.no_truncation()
        self._source = source
        self.model_max_length = model_max_length

        self.bos_id = self._required_id(bos_token, "bos_token")
        self.eos_id = self._required_id(eos_token, "eos_token")
        if pad_id is not None:
            if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < self.vocab_size:
                raise InputError(
                    f"pad_id must be an integer in [0, {self.vocab_size}), got {pad_id!r}; "
                    f"pass a token id of this vocabulary"
                )
            self.pad_id = pad_id
        else:
            # No pad token: padding with eos is the usual convention, and the
            # attention mask hides pad positions anyway.
            pad_from_token = self._required_id(pad_token, "pad_token")
            self.pad_id = pad_from_token if pad_from_token is not None else self.eos_id

        if add_bos_token and self.bos_id is None:
            raise ConfigError(
                f"{source}: add_bos_token is true but no bos_token is set; "
                f"set bos_token in tokenizer_config.json or turn add_bos_token off"
            )
        if add_eos_token and self.eos_id is None:
            raise ConfigError(
                f"{source}: add_eos_token is true but no eos_token is set; "
                f"set eos_token in tokenizer_config.json or turn add_eos_token off"
            )

        # The post-processor in tokenizer.json may already add BOS/EOS (e.g. a
        # TemplateProcessing); then the config's add_*_token must not add a
        # second one. Ask the backend rather than parse its post-processor JSON.
        with_special = self._backend.encode(_PROBE_TEXT, add_special_tokens=True).ids
        without_special = self._backend.encode(_PROBE_TEXT, add_special_tokens=False).ids
        self._backend_adds_bos = (
            self.bos_id is not None
            and with_special[:1] == [self.bos_id]
            and without_special[:1] != [self.bos_id]
        )
        self._backend_adds_eos = (
            self.eos_id is not None
            and with_special[-1:] == [self.eos_id]
            and without_special[-1:] != [self.eos_id]
        )
        self.adds_bos = self._backend_adds_bos or add_bos_token
        self.adds_eos = self._backend_adds_eos or add_eos_token

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, path: PathLike, *, pad_id: Optional[int] = None) -> "Tokenizer":
        """Load ``tokenizer.json`` from a directory, with its tokenizer_config.json and special_tokens_map.json if present."""
        directory = Path(path)
        if not directory.is_dir():
            raise CheckpointError(
                f"tokenizer directory {directory} does not exist or is not a directory; "
                f"pass the checkpoint directory that holds {TOKENIZER_FILE}"
            )
        tokenizer_json = directory / TOKENIZER_FILE
        if not tokenizer_json.is_file():
            raise CheckpointError(
                f"no {TOKENIZER_FILE} in {directory} (looked for {tokenizer_json}); "
                f"download the checkpoint's tokenizer files into that directory"
            )
        config = directory / TOKENIZER_CONFIG_FILE
        special_tokens_map = directory / SPECIAL_TOKENS_MAP_FILE
        return cls.from_file(
            tokenizer_json,
            tokenizer_config=config if config.is_file() else None,
            special_tokens_map=special_tokens_map if special_tokens_map.is_file() else None,
            pad_id=pad_id,
        )

    @classmethod
    def from_file(
        cls,
        tokenizer_json: PathLike,
        tokenizer_config: Optional[PathLike] = None,
        *,
        special_tokens_map: Optional[PathLike] = None,
        pad_id: Optional[int] = None,
    ) -> "Tokenizer":
        """Load a ``tokenizer.json`` file, optionally with a tokenizer_config.json and a special_tokens_map.json.

        Token strings come from tokenizer_config.json; special_tokens_map.json
        fills in any the config leaves unset.
        """
        tokenizer_json = Path(tokenizer_json)
        if not tokenizer_json.is_file():
            raise CheckpointError(
                f"tokenizer file {tokenizer_json} does not exist; "
                f"pass the path of the checkpoint's {TOKENIZER_FILE}"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # the Rust side raises a bare Exception for any parse error
            raise CheckpointError(
                f"{tokenizer_json} is not a valid tokenizers file ({exc}); "
                f"re-download the checkpoint's {TOKENIZER_FILE}"
            ) from exc

        config: dict = {}
        config_path = Path(tokenizer_config) if tokenizer_config is not None else None
        if config_path is not None:
            if not config_path.is_file():
                raise CheckpointError(
                    f"tokenizer config {config_path} does not exist; pass an existing "
                    f"{TOKENIZER_CONFIG_FILE} or none"
                )
            config = _read_json(config_path, ConfigError, "tokenizer config")
            if not isinstance(config, dict):
                raise ConfigError(
                    f"{config_path} must hold a JSON object, got {type(config).__name__}; fix the file"
                )

        token_map: dict = {}
        map_path = Path(special_tokens_map) if special_tokens_map is not None else None
        if map_path is not None:
            token_map = _read_json(map_path, ConfigError, "special tokens map")
            if not isinstance(token_map, dict):
                raise ConfigError(
                    f"{map_path} must hold a JSON object, got {type(token_map).__name__}; fix the file"
                )

        def token(key: str) -> Optional[str]:
            from_config = _token_string(config.get(key), key, config_path)
            if from_config is not None:
                return from_config
            return _token_string(token_map.get(key), key, map_path)

        return cls(
            backend,
            bos_token=token("bos_token"),
            eos_token=token("eos_token"),
            pad_token=token("pad_token"),
            add_bos_token=_optional_bool(config, "add_bos_token", config_path),
            add_eos_token=_optional_bool(config, "add_eos_token", config_path),
            model_max_length=_model_max_length(config, config_path),
            pad_id=pad_id,
            source=str(config_path or tokenizer_json),
        )

    def _required_id(self, token: Optional[str], key: str) -> Optional[int]:
        """The id of a configured special token; a token missing from the vocabulary is a broken checkpoint."""
        if token is None:
            return None
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise CheckpointError(
                f"{self._source}: {key} {token!r} is not in the tokenizer vocabulary; "
                f"the tokenizer files do not match each other, re-download them"
            )
        return token_id

    # --------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of ``token``, or None if it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, adds_bos={self.adds_bos}, adds_eos={self.adds_eos})"
        )

    # ---------------------------------------------------------------- encoding

    def encode(self, text: str, *, max_length: Optional[int] = None, truncation_side: str = "right",
               add_special_tokens: bool = True) -> list:
        """Token ids of one text (special tokens included unless add_special_tokens=False)."""
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        batch = self.encode_batch([text], max_length=max_length, truncation_side=truncation_side,
                                  add_special_tokens=add_special_tokens)
        return batch.input_ids[0].tolist()

    def encode_batch(
        self,
        texts: Sequence[str],
        max_length: Optional[int] = None,
        truncation_side: str = "right",
        padding_side: str = "left",
        add_special_tokens: bool = True,
    ) -> Batch:
        """Encode, truncate (only if ``max_length`` is given) and pad a list of texts.

        ``truncation_side="right"`` keeps the beginning of a text, ``"left"``
        keeps its end; a BOS/EOS is never cut off, the text tokens are.
        ``padding_side="left"`` (the default) puts padding before the tokens.
        """
        sequences, num_truncated = self.tokenize(texts, max_length, truncation_side, add_special_tokens)
        return self.pad(sequences, padding_side, num_truncated)

    def tokenize(
        self,
        texts: Sequence[str],
        max_length: Optional[int] = None,
        truncation_side: str = "right",
        add_special_tokens: bool = True,
        allow_empty: bool = False,
    ) -> tuple:
        """(token id lists, number truncated): encode_batch without the padding, for callers that batch themselves.

        allow_empty: a text that gives no token at all comes back as [] instead of raising.
        """
        check_texts(texts)
        if truncation_side not in TRUNCATION_SIDES:
            raise InputError(f"truncation_side must be one of {TRUNCATION_SIDES}, got {truncation_side!r}")

        prefix = [self.bos_id] if add_special_tokens and self.adds_bos else []
        suffix = [self.eos_id] if add_special_tokens and self.adds_eos else []
        self._check_max_length(max_length, len(prefix) + len(suffix))

        sequences = []
        num_truncated = 0
        for index, body in enumerate(self._text_token_ids(list(texts), add_special_tokens) if texts else []):
            if max_length is not None:
                room = max_length - len(prefix) - len(suffix)
                if len(body) > room:
                    body = body[:room] if truncation_side == "right" else body[len(body) - room:]
                    num_truncated += 1
            sequence = prefix + body + suffix
            if not sequence and not allow_empty:
                raise InputError(
                    f"text at index {index} encodes to no tokens (it is empty) and this tokenizer adds "
                    f"no BOS; drop empty texts or give them content"
                )
            sequences.append(sequence)
        return sequences, num_truncated

    def _text_token_ids(self, texts: list, add_special_tokens: bool) -> list:
        """Per text, the backend's ids without the BOS/EOS its post-processor adds (re-added by the caller)."""
        # encode_batch_fast skips offset bookkeeping we do not use (tokenizers >= 0.20).
        encode_many = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        try:
            encodings = encode_many(texts, add_special_tokens=add_special_tokens)
        except TypeError:
            # The Rust side rejects strings that are not valid Unicode (lone
            # surrogates) for the whole batch; find and name the bad one.
            for index, text in enumerate(texts):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise InputError(
                        f"text at index {index} is not valid Unicode ({exc.reason}); "
                        f"clean the text, e.g. text.encode('utf-8', 'replace').decode()"
                    ) from exc
            raise

        bodies = []
        for encoding in encodings:
            ids = encoding.ids
            if add_special_tokens:
                # Strip what the post-processor added so truncation applies to
                # text tokens only; encode_batch puts them back at the ends.
                if self._backend_adds_bos and ids[:1] == [self.bos_id]:
                    ids = ids[1:]
                if self._backend_adds_eos and ids[-1:] == [self.eos_id]:
                    ids = ids[:-1]
            bodies.append(ids)
        return bodies

    def pad(self, sequences: list, padding_side: str = "left", num_truncated: int = 0) -> Batch:
        """A padded Batch of token id lists (left padding by default)."""
        if padding_side not in PADDING_SIDES:
            raise InputError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        if not sequences:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return Batch(input_ids=empty, attention_mask=empty.clone(), lengths=[], num_truncated=0)
        lengths = [len(sequence) for sequence in sequences]
        width = max(lengths)
        if min(lengths) != width and self.pad_id is None:
            raise ConfigError(
                f"{self._source}: this batch needs padding but the tokenizer has neither a pad_token nor "
                f"an eos_token; set pad_token in tokenizer_config.json or pass pad_id= to the Tokenizer"
            )
        pad_id = self.pad_id if self.pad_id is not None else 0  # unused when no row is padded
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            start = width - len(sequence) if padding_side == "left" else 0
            input_ids[row, start:start + len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, start:start + len(sequence)] = 1
        return Batch(input_ids=input_ids, attention_mask=attention_mask, lengths=lengths,
                     num_truncated=num_truncated)

    @staticmethod
    def _check_max_length(max_length: Optional[int], num_special: int) -> None:
        if max_length is None:
            return
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise InputError(f"max_length must be a positive integer or None, got {max_length!r}")
        if max_length <= num_special:
            raise InputError(
                f"max_length={max_length} leaves no room for text after the {num_special} special "
                f"token(s) (BOS/EOS) this tokenizer adds; use max_length >= {num_special + 1}"
            )

    # ---------------------------------------------------------------- decoding

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of token ids (a list of ints or a 1-D tensor)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise InputError(f"decode takes a 1-D sequence of ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        for index, token_id in enumerate(ids):
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
                raise InputError(
                    f"id at index {index} is {token_id!r}, not a token id in [0, {self.vocab_size})"
                )
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)


def check_texts(texts) -> None:
    """A list or tuple of str, or an InputError naming the first offending item."""
    if isinstance(texts, str):
        raise InputError("texts must be a list of strings, got a single str; pass [text] instead")
    if not isinstance(texts, (list, tuple)):
        raise InputError(f"texts must be a list or tuple of strings, got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"text at index {index} is {type(text).__name__}, not str; pass only strings")
