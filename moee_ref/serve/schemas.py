"""Request bodies checked field by field, and the response bodies, in OpenAI's embeddings contract.

A field of the wrong JSON type is a 422; a value of the right type that cannot be served (an empty input,
an unknown kind, dimensions out of range) is a 400; both name the field in `param`.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ApiError

ENCODING_FORMATS = ("float", "base64")
EMBEDDING_FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "kind", "prompt", "normalize")
ROUTE_FIELDS = ("input", "model", "prompt", "all_tokens", "top", "probs", "max_length", "truncation")


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body: 400 for a body that is not UTF-8 or not JSON (NaN and Infinity included)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start}); send JSON encoded as UTF-8",
                       code="invalid_body") from None
    if not text.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")

    def refuse_constant(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, parse_constant=refuse_constant)
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply to be a request", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, an integer too long to convert, NaN/Infinity
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def _type_name(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _wrong_type(field: str, wanted: str, value) -> ApiError:
    return ApiError(422, f"'{field}' must be {wanted}, got {_type_name(value)}", param=field, code="invalid_type")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fields(body, allowed: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_type_name(body)}", code="invalid_request")
    unknown = [key for key in body if key not in allowed]
    if unknown:
        raise ApiError(400, f"unrecognized request argument supplied: {unknown[0]} (this endpoint takes {', '.join(allowed)})",
                       param=unknown[0], code="unknown_parameter")
    for required in ("input", "model"):
        if required not in body:
            raise ApiError(400, f"you must provide '{required}'", param=required, code="missing_parameter")
    if not isinstance(body["model"], str):
        raise _wrong_type("model", "a string", body["model"])
    return body


def _optional(body: dict, field: str, check, wanted: str, default=None):
    value = body.get(field)
    if value is None:
        return default
    if not check(value):
        raise _wrong_type(field, wanted, value)
    return value


@dataclass
class EmbeddingRequest:
    model: str
    texts: list[str] | None  # the input as text, or
    token_ids: list[list[int]] | None  # as token id lists (decoded to text before embedding)
    encoding_format: str
    dimensions: int | None
    kind: str | None
    prompt: str | None
    normalize: bool | None

    @property
    def count(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids)


def parse_embedding_request(body, max_inputs: int, vocab_size: int) -> EmbeddingRequest:
    body = _fields(body, EMBEDDING_FIELDS)
    texts, token_ids = parse_input(body["input"], max_inputs, vocab_size)
    encoding_format = _optional(body, "encoding_format", lambda v: isinstance(v, str), "a string", "float")
    if encoding_format not in ENCODING_FORMATS:
        raise ApiError(400, f"encoding_format {encoding_format!r} is not supported; choose 'float' or 'base64'",
                       param="encoding_format", code="invalid_value")
    dimensions = _optional(body, "dimensions", _is_int, "an integer")
    if dimensions is not None and dimensions < 1:
        raise ApiError(400, f"dimensions must be at least 1, got {dimensions}", param="dimensions", code="invalid_value")
    _optional(body, "user", lambda v: isinstance(v, str), "a string")
    return EmbeddingRequest(
        model=body["model"], texts=texts, token_ids=token_ids, encoding_format=encoding_format, dimensions=dimensions,
        kind=_optional(body, "kind", lambda v: isinstance(v, str), "a string"),
        prompt=_optional(body, "prompt", lambda v: isinstance(v, str), "a string"),
        normalize=_optional(body, "normalize", lambda v: isinstance(v, bool), "a boolean"),
    )


def parse_input(value, max_inputs: int, vocab_size: int) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token id lists) from OpenAI's four input shapes."""
    wanted = "a string, an array of strings, an array of token ids or an array of arrays of token ids"
    if isinstance(value, str):
        texts = [value]
    elif not isinstance(value, list):
        raise _wrong_type("input", wanted, value)
    elif not value:
        raise ApiError(400, "'input' is an empty array; send at least one input", param="input", code="empty_input")
    elif all(isinstance(v, str) for v in value):
        texts = value
    elif all(_is_int(v) for v in value):
        return None, [check_ids(value, vocab_size, None)]
    elif all(isinstance(v, list) and all(_is_int(i) for i in v) for v in value):
        if len(value) > max_inputs:
            raise too_many(len(value), max_inputs)
        return None, [check_ids(v, vocab_size, i) for i, v in enumerate(value)]
    else:
        raise ApiError(422, f"'input' must be {wanted}; the array mixes types or nests deeper", param="input", code="invalid_type")
    if len(texts) > max_inputs:
        raise too_many(len(texts), max_inputs)
    for index, text in enumerate(texts):
        if not text.strip():
            raise ApiError(400, f"input at index {index} is empty or whitespace only; every input must hold some text",
                           param="input", code="empty_input")
    return texts, None


def too_many(count: int, limit: int) -> ApiError:
    return ApiError(400, f"'input' holds {count} inputs; this server takes at most {limit} per request (--max-inputs): "
                    "send them in several requests", param="input", code="too_many_inputs")


def check_ids(ids: list[int], vocab_size: int, index: int | None) -> list[int]:
    where = "" if index is None else f" at index {index}"
    if not ids:
        raise ApiError(400, f"the token id array{where} is empty", param="input", code="empty_input")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad}{where} is not an id of this model's tokenizer (0 to {vocab_size - 1})",
                       param="input", code="invalid_token_id")
    return ids


@dataclass
class RouteRequest:
    model: str
    texts: list[str]
    prompt: str | None
    all_tokens: bool
    top: int | None
    probs: bool
    max_length: int | None
    truncation: str | None


def parse_route_request(body, max_inputs: int) -> RouteRequest:
    body = _fields(body, ROUTE_FIELDS)
    value = body["input"]
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise _wrong_type("input", "a string or an array of strings", value)
    if not texts:
        raise ApiError(400, "'input' is an empty array; send at least one text", param="input", code="empty_input")
    if len(texts) > max_inputs:
        raise too_many(len(texts), max_inputs)
    for index, text in enumerate(texts):
        if not text.strip():
            raise ApiError(400, f"input at index {index} is empty or whitespace only", param="input", code="empty_input")
    positive = lambda v: _is_int(v)  # noqa: E731
    request = RouteRequest(
        model=body["model"], texts=texts,
        prompt=_optional(body, "prompt", lambda v: isinstance(v, str), "a string"),
        all_tokens=_optional(body, "all_tokens", lambda v: isinstance(v, bool), "a boolean", False),
        top=_optional(body, "top", positive, "an integer"),
        probs=_optional(body, "probs", lambda v: isinstance(v, bool), "a boolean", False),
        max_length=_optional(body, "max_length", positive, "an integer"),
        truncation=_optional(body, "truncation", lambda v: isinstance(v, str), "a string"),
    )
    if request.truncation not in (None, "left", "right"):
        raise ApiError(400, f"truncation {request.truncation!r} is not valid; choose 'left' or 'right'", param="truncation",
                       code="invalid_value")
    for field in ("top", "max_length"):
        if getattr(request, field) is not None and getattr(request, field) < 1:
            raise ApiError(400, f"{field} must be at least 1", param=field, code="invalid_value")
    return request


def embedding_item(vector: np.ndarray, index: int, encoding_format: str) -> dict:
    vector = np.asarray(vector, dtype="<f4")
    embedding = base64.b64encode(vector.tobytes()).decode("ascii") if encoding_format == "base64" else vector.tolist()
    return {"object": "embedding", "index": index, "embedding": embedding}


def embeddings_response(vectors, model: str, encoding_format: str, prompt_tokens: int) -> dict:
    return {"object": "list", "data": [embedding_item(v, i, encoding_format) for i, v in enumerate(vectors)], "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
