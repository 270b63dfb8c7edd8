"""The HTTP front end: OpenAI's /v1/embeddings, /v1/route, /v1/models, /health and /metrics, on Starlette.

It checks requests, turns each into an EmbedSpec (embedding/spec.py), counts its tokens as the embedder runs
them (MoEEmbedder.token_ids: the prompt applied, the text cut), queues it on the batcher and writes the
answer. The vectors come from the pipeline (embedding/pipeline.py run), the output conventions
(`dimensions`, unit length) from the same functions encode() applies: a vector equals encode()'s.
"""

from __future__ import annotations

import hmac
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Hashable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import numpy as np

from ..embedding import pipeline
from ..embedding.conventions import check_truncate_dim, truncated
from ..embedding.kinds import KINDS, get_kind, normalize_rows
from ..embedding.routing import route_texts
from ..embedding.spec import EmbedSpec, FeatureOptions
from ..errors import InputError, MoEERefError
from .batcher import Batcher
from .errors import ApiError
from .metrics import Metrics
from .schemas import embeddings_response, parse_embedding_request, parse_json, parse_route_request

log = logging.getLogger("moee.serve")


@dataclass
class ServeConfig:
    """The server's settings: the defaults of requests (kind, prompt, normalize, alpha) and its limits."""

    model_name: str  # the name clients send as "model"
    kind: str = "moee-sum"
    prompt: str | None = None
    normalize: bool = True
    alpha: float = 1.0
    max_input_tokens: int | None = None  # None: the model's context (max_position_embeddings)
    truncate: bool = False  # cut over-long inputs (the text, never the prompt) instead of refusing them
    max_inputs: int = 2048  # per request
    max_body: int = 32 * 2**20  # bytes
    read_timeout: float = 30.0  # seconds to receive a whole body
    api_key: str | None = None
    max_batch_size: int = 32
    max_batch_tokens: int = 16384
    max_queue: int = 4096  # inputs
    batch_wait: float = 0.02  # seconds a batch may wait for the clients the last one answered
    shutdown_timeout: float = 30.0


class Service:
    """The embedder, the batcher and the state one app serves."""

    def __init__(self, embedder, config: ServeConfig):
        self.embedder = embedder
        self.config = config
        self.tokenizer = embedder.tokenizer
        context = embedder.max_seq_length
        self.token_limit = min(config.max_input_tokens or context, context)
        self.metrics = Metrics()
        self.batcher = Batcher(self.compute, max_batch_size=config.max_batch_size, max_batch_tokens=config.max_batch_tokens,
                               max_queue=config.max_queue, batch_wait=config.batch_wait, metrics=self.metrics, error_of=self.error_of)
        self.stopping = False
        self.in_flight = 0  # accepted requests not yet answered
        self.created = int(time.time())
        self.spec(config.kind, config.prompt)  # the defaults checked before the server listens

    # ------------------------------------------------------------------ worker thread

    def compute(self, key: Hashable, inputs: list) -> list:
        what, settings = key
        if what == "route":
            options, all_tokens, top, probs = settings
            _, results, _ = route_texts(self.embedder, inputs, options, all_tokens=all_tokens, top=top, all_probs=probs)
            return results
        result = pipeline.run(self.embedder, inputs, settings, batch_size=self.config.max_batch_size, show_progress_bar=False)
        return list(result.vectors)

    @staticmethod
    def error_of(exc: Exception) -> ApiError:
        if isinstance(exc, InputError):
            return ApiError(400, str(exc), code="invalid_input")
        log.error("a batch failed:\n%s", "".join(traceback.format_exception(exc)))
        kind = "a numerical error" if isinstance(exc, ArithmeticError) else type(exc).__name__
        return ApiError(500, f"the batch holding this request failed ({kind}): {exc}", code="batch_failed")

    # ------------------------------------------------------------------ helpers

    def check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), key.encode("utf-8")):
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.config.model_name}'",
                           param="model", code="model_not_found")

    async def read_body(self, request: Request):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(415, f"the body must be JSON sent with 'Content-Type: application/json', not {content_type or 'none'!r}",
                           code="unsupported_media_type")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "the Content-Length header is not a number", code="invalid_body")
            if int(length) > self.config.max_body:
                raise self.too_large(int(length))
        chunks, size = [], 0
        try:
            with anyio.fail_after(self.config.read_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.config.max_body:
                        raise self.too_large(size)
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"the body did not arrive within {self.config.read_timeout:g} s", code="timeout") from None
        return parse_json(b"".join(chunks))

    def too_large(self, size: int) -> ApiError:
        return ApiError(413, f"the body has {'at least ' if size else ''}{size} bytes; this server takes at most "
                        f"{self.config.max_body} (--max-body): send fewer inputs per request", code="body_too_large")

    def spec(self, kind: str, prompt: str | None) -> EmbedSpec:
        """The settings a request's vectors are computed with: normalize and dimensions are applied afterwards, per
        request, so that requests that differ only there share batches."""
        return EmbedSpec(kind=kind, prompt=prompt, alpha=self.config.alpha, max_length=self.token_limit,
                         truncation="right" if self.config.truncate else None).check()

    def token_counts(self, texts: list[str], options: FeatureOptions) -> list[int]:
        """Per text, the tokens it runs as (the prompt applied, cut to the limit where the server truncates).
        On a worker thread of the event loop: tokenizing a large request takes a while."""
        lenient = FeatureOptions(**{**vars(options), "truncation": options.truncation or "right"})
        sequences, cut = self.embedder.token_ids(texts, lenient)
        if cut and options.truncation is None:
            raise ApiError(400, f"input at index {cut[0]} has more than {options.max_length} tokens with the prompt; the limit "
                           f"is {options.max_length} tokens per input: shorten it (or start the server with --truncate to cut "
                           "over-long inputs)",
                           param="input", code="context_length_exceeded")
        return [len(s) for s in sequences]

    def decode(self, token_ids: list[list[int]]) -> list[str]:
        texts = [self.tokenizer.decode(ids) for ids in token_ids]
        empty = next((i for i, t in enumerate(texts) if not t.strip()), None)
        if empty is not None:
            raise ApiError(400, f"the token ids at index {empty} decode to an empty or whitespace-only text",
                           param="input", code="empty_input")
        return texts

    # ------------------------------------------------------------------ endpoints

    async def embeddings(self, request: Request) -> Response:
        body = await self.read_body(request)
        req = parse_embedding_request(body, self.config.max_inputs, self.tokenizer.vocab_size)
        self.check_model(req.model)
        kind = req.kind or self.config.kind
        try:
            get_kind(kind)  # the kinds registry: what the pipeline computes
        except InputError as exc:
            raise ApiError(400, str(exc), param="kind", code="invalid_value") from None
        try:
            spec = self.spec(kind, self.config.prompt if req.prompt is None else req.prompt)
        except InputError as exc:
            raise ApiError(400, str(exc), param="prompt", code="invalid_value") from None
        try:  # the first d columns: for one-part kinds (hs, rw), as encode()'s truncate_dim
            check_truncate_dim(req.dimensions, get_kind(kind), self.embedder.dimension(kind))
        except InputError as exc:
            raise ApiError(400, str(exc).replace("truncate_dim", "dimensions"), param="dimensions", code="invalid_value") from None
        texts = req.texts if req.texts is not None else await anyio.to_thread.run_sync(self.decode, req.token_ids)
        counts = await anyio.to_thread.run_sync(self.token_counts, texts, spec.features)
        rows = await self.batcher.submit(("embed", spec), texts, counts)
        vectors = truncated(np.stack(rows), req.dimensions)  # what encode() does after the pipeline
        if self.config.normalize if req.normalize is None else req.normalize:
            vectors = normalize_rows(vectors)
        return JSONResponse(embeddings_response(vectors, req.model, req.encoding_format, sum(counts)))

    async def route(self, request: Request) -> Response:
        body = await self.read_body(request)
        req = parse_route_request(body, self.config.max_inputs)
        self.check_model(req.model)
        if self.embedder.streamed:
            raise ApiError(400, "/v1/route needs a resident model; this server runs layer-streamed (--memory-budget)",
                           code="unsupported")
        if req.max_length is not None and req.max_length > self.token_limit:
            raise ApiError(400, f"max_length {req.max_length} is more than this server's limit of {self.token_limit} tokens",
                           param="max_length", code="invalid_value")
        truncation = req.truncation or ("right" if self.config.truncate else None)
        try:
            options = FeatureOptions(prompt=req.prompt, max_length=req.max_length or self.token_limit, truncation=truncation).check()
            EmbedSpec(prompt=req.prompt).check()
        except InputError as exc:
            raise ApiError(400, str(exc), param="prompt", code="invalid_value") from None
        counts = await anyio.to_thread.run_sync(self.token_counts, req.texts, options)
        key = ("route", (options, req.all_tokens, req.top, req.probs))
        results = await self.batcher.submit(key, req.texts, counts, batchable=False)
        return JSONResponse({"object": "route", "model": req.model, "moe_layers": list(self.embedder.args.moe_layers),
                             "texts": results, "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        self.check_model(request.path_params["name"])
        return JSONResponse(self.model_card())

    def model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "moee-ref",
                "kinds": {kind: self.embedder.dimension(kind) for kind in KINDS}, "default_kind": self.config.kind,
                "max_input_tokens": self.token_limit}

    async def health(self, request: Request) -> Response:
        if not self.batcher.alive:
            return JSONResponse({"status": "worker stopped"}, status_code=503)
        if self.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok", "queued_inputs": self.batcher.queued_inputs})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    # ------------------------------------------------------------------ plumbing

    def endpoint(self, name: str, handler, *, auth: bool = True, during_stop: bool = False):
        """handler with auth, the stop check, the in-flight count, OpenAI-shaped errors and the metrics."""

        async def run(request: Request) -> Response:
            start = time.perf_counter()
            try:
                if auth:
                    self.check_auth(request)
                if self.stopping and not during_stop:
                    raise ApiError(503, "the server is shutting down; send the request to another replica", code="shutting_down")
                self.in_flight += 1
                try:
                    response = await handler(request)
                finally:
                    self.in_flight -= 1
            except ApiError as exc:
                response = error_response(exc)
            except MoEERefError as exc:  # a check of the embedding API the server's own checks did not make first
                response = error_response(ApiError(400, str(exc), code="invalid_input"))
            except Exception as exc:  # noqa: BLE001
                log.error("%s failed:\n%s", name, "".join(traceback.format_exception(exc)))
                response = error_response(ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error"))
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            self.metrics.duration.labels(name).observe(time.perf_counter() - start)
            return response

        return run


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def build_app(service: Service) -> Starlette:
    s = service

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.method} {request.url.path}; see /v1/embeddings, /v1/route, /v1/models, /health, /metrics",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        s.metrics.requests.labels("other", str(exc.status_code)).inc()
        return error_response(ApiError(exc.status_code, message, code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)))

    routes = [
        Route("/v1/embeddings", s.endpoint("embeddings", s.embeddings), methods=["POST"]),
        Route("/v1/route", s.endpoint("route", s.route), methods=["POST"]),
        Route("/v1/models", s.endpoint("models", s.models), methods=["GET"]),
        Route("/v1/models/{name:path}", s.endpoint("models", s.model), methods=["GET"]),
        Route("/health", s.endpoint("health", s.health, auth=False, during_stop=True), methods=["GET"]),
        Route("/metrics", s.endpoint("metrics", s.metrics_text, auth=False, during_stop=True), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
