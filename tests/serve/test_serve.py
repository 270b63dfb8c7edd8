"""`moee serve` with real clients over loopback: the openai client, plain HTTP, LangChain, many clients at once,
and every bad request. One server for the module (float32, a small random OLMoE), compared with
MoEEmbedder.encode of the same texts in this process."""

from __future__ import annotations

import base64
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint
from moee_ref.embedding.embedder import MoEEmbedder
from moee_ref.embedding.kinds import KINDS
from serve_fixtures import API_KEY, ServerProcess, require

require("httpx", "openai", "starlette", "uvicorn", "prometheus_client")
import httpx  # noqa: E402
import openai  # noqa: E402

TOL = 1e-5
MAX_TOKENS = 64
MAX_BODY = 256 * 1024
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Rain is expected tomorrow.",
    "Hidden states from every layer can serve as sentence embeddings, the paper says.",
    "Cats sleep.",
    "A",
    "The museum displays paintings, sculptures and ancient manuscripts.",
]
POOL = [f"text {i}: " + " ".join(["cats", "rain", "markets", "music", "trains"][j % 5] for j in range(i % 11 + 1)) for i in range(60)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("serve") / "olmoe", SMALL_CONFIGS["olmoe"], seed=21)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess(model_dir, "--dtype", "float32", "--api-key", API_KEY, "--max-batch-size", "16",
                        "--max-input-tokens", str(MAX_TOKENS), "--max-body", str(MAX_BODY), "--read-timeout", "1",
                        "--max-inputs", "64", "--kind", "moee-sum")
    try:
        yield srv.check_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def embedder(model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield MoEEmbedder.from_pretrained(model_dir, dtype=torch.float32)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


def vectors_of(payload) -> np.ndarray:
    data = payload["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if isinstance(d["embedding"], str) else d["embedding"] for d in data]
    return np.asarray(rows, np.float32)


def close(a, b) -> None:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(a - b).max() <= TOL, np.abs(a - b).max()


def embed(http, **body):
    return http.post("/v1/embeddings", json={"model": body.pop("model", None) or SERVED[0], **body})


SERVED = []


@pytest.fixture(scope="module", autouse=True)
def served_name(server):
    SERVED[:] = [server.model]


def answers_correctly(http, embedder) -> None:
    """The server still answers right (after a bad request)."""
    response = embed(http, input=TEXTS[:2])
    assert response.status_code == 200, response.text
    close(vectors_of(response.json()), embedder.encode(TEXTS[:2], "moee-sum", normalize=True))


# ----------------------------------------------------------------------------- clients


@pytest.mark.parametrize("kind", list(KINDS))
def test_openai_client_equals_encode(client, server, embedder, kind):
    if kind not in ("hs", "rw"):  # a cut [HS; RW] would drop RW: refused as encode() refuses truncate_dim
        with pytest.raises(openai.BadRequestError, match="dimensions=16 is refused"):
            client.embeddings.create(model=server.model, input=TEXTS, dimensions=16, extra_body={"kind": kind})
    for dimensions in (None, 16) if kind in ("hs", "rw") else (None,):
        extra = {} if dimensions is None else {"dimensions": dimensions}
        want = embedder.encode(TEXTS, kind, normalize=True, truncate_dim=dimensions)
        got = client.embeddings.create(model=server.model, input=TEXTS, extra_body={"kind": kind}, **extra)  # base64
        close([d.embedding for d in got.data], want)
        assert [d.index for d in got.data] == list(range(len(TEXTS)))
        floats = client.embeddings.create(model=server.model, input=TEXTS, encoding_format="float", extra_body={"kind": kind}, **extra)
        close([d.embedding for d in floats.data], want)
        assert np.allclose(np.linalg.norm(want, axis=1), 1, atol=1e-5)  # unit vectors by default, as OpenAI's


def test_plain_http_shapes_usage_and_token_ids(http, server, embedder):
    response = embed(http, input=TEXTS, encoding_format="float", kind="hs", prompt="prompteol", normalize=False)
    payload = response.json()
    assert response.status_code == 200 and payload["object"] == "list" and payload["model"] == server.model
    assert all(d["object"] == "embedding" for d in payload["data"])
    close(vectors_of(payload), embedder.encode(TEXTS, "hs", prompt="prompteol"))
    template = 'This sentence : "{text}" means in one word:"'
    tokens = sum(len(embedder.tokenizer.encode(template.replace("{text}", t))) for t in TEXTS)
    assert payload["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    # a single string, token ids, lists of token ids: equal to the text's vectors
    single = embed(http, input=TEXTS[0]).json()
    close(vectors_of(single), embedder.encode(TEXTS[:1], "moee-sum", normalize=True))
    ids = [embedder.tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    by_ids = embed(http, input=ids).json()
    close(vectors_of(by_ids), embedder.encode(TEXTS, "moee-sum", normalize=True))
    assert by_ids["usage"] == embed(http, input=TEXTS).json()["usage"]
    close(vectors_of(embed(http, input=ids[2]).json()), vectors_of(embed(http, input=TEXTS[2]).json()))


def test_models_and_route_match_moee_route(http, server, model_dir, capsys):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [server.model]
    assert http.get(f"/v1/models/{server.model}").status_code == 200
    texts = ["A man is playing a guitar.", "Rain."]
    routed = http.post("/v1/route", json={"model": server.model, "input": texts, "top": 3, "probs": True})
    assert routed.status_code == 200, routed.text
    from moee_ref.cli.main import main

    assert main(["route", "--model", str(model_dir), "--dtype", "float32", "--json", "--top", "3", *texts]) == 0
    cli = json.loads(capsys.readouterr().out)
    got = routed.json()
    assert got["moe_layers"] == cli["moe_layers"]
    for ours, theirs in zip(got["texts"], cli["texts"], strict=True):
        assert ours["text"] == theirs["text"]
        for a, b in zip(ours["tokens"], theirs["tokens"], strict=True):
            assert (a["position"], a["token_id"], a["token"]) == (b["position"], b["token_id"], b["token"])
            for la, lb in zip(a["layers"], b["layers"], strict=True):
                assert la["layer"] == lb["layer"] and la["experts"] == lb["experts"]
                for field in ("weights", "probs", "entropy"):
                    assert np.allclose(la[field], lb[field], atol=1e-5)
                assert len(la["router_probs"]) == SMALL_CONFIGS["olmoe"]["num_experts"]
                assert abs(sum(la["router_probs"]) - 1) < 1e-4


def test_langchain_openai_embeddings(server, embedder):
    lc = pytest.importorskip("langchain_openai")
    # LangChain tokenizes with tiktoken (OpenAI's ids, not this model's) unless told not to: the README says so.
    emb = lc.OpenAIEmbeddings(model=server.model, base_url=server.url + "/v1", api_key=API_KEY, check_embedding_ctx_length=False,
                              max_retries=0)
    close(emb.embed_documents(TEXTS), embedder.encode(TEXTS, "moee-sum", normalize=True))
    close(emb.embed_query(TEXTS[1]), embedder.encode(TEXTS[1], "moee-sum", normalize=True))


def test_concurrent_clients_are_batched_and_exact(server, embedder):
    reference = embedder.encode(POOL, "moee-sum", normalize=True)
    rng = np.random.default_rng(0)
    requests = [rng.choice(len(POOL), size=int(rng.integers(1, 9))).tolist() for _ in range(320)]

    def worker(chunk):
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
            out = []
            for rows in chunk:
                r = c.post("/v1/embeddings", json={"model": server.model, "input": [POOL[i] for i in rows]})
                out.append((rows, r.status_code, r.json()))
            return out

    chunks = [requests[i::32] for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = [a for part in pool.map(worker, chunks) for a in part]
    assert len(answers) == len(requests)
    for rows, status, payload in answers:
        assert status == 200, payload
        close(vectors_of(payload), reference[rows])
    metrics = httpx.get(server.url + "/metrics").text
    count = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("moee_batch_size_count")))
    total = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("moee_batch_size_sum")))
    assert total / count > 1.5, (total, count)  # batches were formed across requests
    big = [line for line in metrics.splitlines() if line.startswith('moee_batch_size_bucket{le="8.0"}')]
    assert float(big[0].split()[1]) < count  # some batches held more than 8 inputs


def test_large_request_is_split_not_refused(http, embedder):
    texts = POOL[:50]  # more than --max-batch-size 16
    close(vectors_of(embed(http, input=texts).json()), embedder.encode(texts, "moee-sum", normalize=True))


# ----------------------------------------------------------------------------- bad requests


def error_of(response, status: int, *words: str):
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    return error


BAD = [
    # (name, body bytes or json, content type, status, words in the message)
    ("malformed json", b'{"model": "m", "input": ', "application/json", 400, ["not valid JSON"]),
    ("not utf-8", b'{"model": "m", "input": "\xff\xfe"}', "application/json", 400, ["UTF-8"]),
    ("nan", b'{"model": "M", "input": "a", "dimensions": NaN}', "application/json", 400, ["NaN"]),
    ("huge integer literal", b'{"model": "M", "input": "a", "dimensions": 1' + b"0" * 5000 + b"}", "application/json", 400, ["JSON"]),
    ("deep nesting", b"[" * 100000 + b"]" * 100000, "application/json", 400, []),
    ("huge number", b'{"model": "M", "input": "a", "dimensions": 1e999}', "application/json", 422, ["integer"]),
    ("not an object", b"[1, 2]", "application/json", 400, ["object"]),
    ("empty body", b"", "application/json", 400, ["empty"]),
    ("wrong content type", b'{"model": "M", "input": "a"}', "text/plain", 415, ["application/json"]),
    ("form body", b"model=M&input=a", "application/x-www-form-urlencoded", 415, ["application/json"]),
]


@pytest.mark.parametrize("name,body,ctype,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_bodies(http, embedder, name, body, ctype, status, words):
    body = body.replace(b'"M"', json.dumps(SERVED[0]).encode())
    error_of(http.post("/v1/embeddings", content=body, headers={"Content-Type": ctype}), status, *words)
    answers_correctly(http, embedder)


BAD_FIELDS = [
    ("empty list", {"input": []}, 400, "input", ["empty"]),
    ("empty string", {"input": ""}, 400, "input", ["empty"]),
    ("blank string in a list", {"input": ["a", "  "]}, 400, "input", ["index 1"]),
    ("empty token list", {"input": [[1, 2], []]}, 400, "input", ["index 1"]),
    ("token id out of range", {"input": [10**30]}, 400, "input", ["not an id"]),
    ("negative token id", {"input": [[5, -1]]}, 400, "input", ["not an id"]),
    ("huge dimensions", {"input": "a", "dimensions": 10**30}, 400, "dimensions", ["dimensions"]),
    ("dimensions of moee-sum", {"input": "a", "dimensions": 8}, 400, "dimensions", ["refused for kind 'moee-sum'"]),
    ("zero dimensions", {"input": "a", "dimensions": 0}, 400, "dimensions", ["at least 1"]),
    ("dimensions as string", {"input": "a", "dimensions": "8"}, 422, "dimensions", ["integer"]),
    ("input as number", {"input": 3.5}, 422, "input", []),
    ("input as object", {"input": {"text": "a"}}, 422, "input", []),
    ("nested garbage", {"input": [[["a"]], {"b": [None]}]}, 422, "input", []),
    ("mixed input", {"input": ["a", 1]}, 422, "input", []),
    ("booleans as ids", {"input": [True, False]}, 422, "input", []),
    ("encoding format", {"input": "a", "encoding_format": "int8"}, 400, "encoding_format", ["base64"]),
    ("encoding format type", {"input": "a", "encoding_format": 1}, 422, "encoding_format", []),
    ("normalize type", {"input": "a", "normalize": "yes"}, 422, "normalize", ["boolean"]),
    ("unknown kind", {"input": "a", "kind": "logits"}, 400, "kind", ["moee-sum"]),
    ("unknown prompt", {"input": "a", "prompt": "no-such-prompt"}, 400, "prompt", []),
    ("unknown field", {"input": "a", "path": "/etc/passwd"}, 400, "path", ["unrecognized"]),
    ("missing input", {}, 400, "input", ["input"]),
    ("model type", {"input": "a", "model": 5}, 422, "model", ["string"]),
    ("too many inputs", {"input": ["a"] * 65}, 400, "input", ["64"]),
    ("too long", {"input": "word " * 200}, 400, "input", [f"limit is {MAX_TOKENS}", "--truncate"]),
]


@pytest.mark.parametrize("name,fields,status,param,words", BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
def test_bad_fields(http, embedder, name, fields, status, param, words):
    body = {"model": SERVED[0], **fields}
    error = error_of(http.post("/v1/embeddings", json=body), status, *words)
    assert error["param"] == param
    answers_correctly(http, embedder)


def test_auth_model_route_and_size_errors(http, server, embedder):
    body = {"model": server.model, "input": "a"}
    error_of(httpx.post(server.url + "/v1/embeddings", json=body), 401, "Bearer")
    error_of(httpx.post(server.url + "/v1/embeddings", json=body, headers={"Authorization": "Bearer wrong"}), 401, "incorrect")
    error_of(httpx.get(server.url + "/v1/models", headers={"Authorization": "Basic abc"}), 401)
    assert error_of(embed(http, model="gpt-4o", input="a"), 404, "gpt-4o")["code"] == "model_not_found"
    error_of(http.get(f"/v1/models/other"), 404)
    error_of(http.get("/v1/nothing"), 404, "no route")
    error_of(http.get("/v1/embeddings"), 405)
    error_of(http.post("/v1/embeddings", json={"model": server.model, "input": ["x" * 1000] * 300}), 413, str(MAX_BODY))
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.embeddings.create(model=server.model, input="a")
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics need no key
    answers_correctly(http, embedder)


def test_slow_client_times_out_and_others_are_served(server, http, embedder):
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as slow:
        slow.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\"")
        start = time.monotonic()
        answers_correctly(http, embedder)  # while the slow body is pending
        assert httpx.get(server.url + "/health", timeout=2).status_code == 200
        slow.settimeout(10)
        reply = b""
        while b"}}" not in reply:  # headers and body may come in separate segments
            chunk = slow.recv(65536)
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"did not arrive" in reply and time.monotonic() - start < 5
    answers_correctly(http, embedder)
