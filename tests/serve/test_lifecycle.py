"""`moee serve`'s lifecycle and limits, each on a server of its own: overload (429 with Retry-After), truncation,
SIGTERM under load (accepted requests finish, new ones 503, exit 0), a second signal, a failed batch (500, the
server stays up), a port in use and a public address without a key (one-line errors)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint
from moee_ref.embedding.embedder import MoEEmbedder
from serve_fixtures import ROOT, ServerProcess, require

require("httpx", "starlette", "uvicorn", "prometheus_client")
import httpx  # noqa: E402

LONG = [" ".join(f"w{i}x{j}" for j in range(40 + 7 * i)) for i in range(8)]  # about 150 to 400 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("serve-life") / "olmoe", SMALL_CONFIGS["olmoe"], seed=22)


@pytest.fixture(scope="module")
def embedder(model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield MoEEmbedder.from_pretrained(model_dir, dtype=torch.float32)
    torch.set_num_threads(threads)


def post(url: str, model: str, inputs, timeout: float = 60):
    return httpx.post(url + "/v1/embeddings", json={"model": model, "input": inputs, "encoding_format": "float"}, timeout=timeout)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def queued_inputs(url: str) -> float:
    return metric(url, "moee_queue_inputs")


def test_overload_answers_or_429_and_truncation(model_dir, embedder):
    srv = ServerProcess(model_dir, "--dtype", "float32", "--max-queue", "4", "--max-batch-size", "2", "--truncate",
                        "--max-input-tokens", "32").check_ready()
    try:
        long_text = LONG[3]
        cut = post(srv.url, srv.model, [long_text]).json()
        want = embedder.encode([long_text], "moee-sum", normalize=True, max_length=32, truncation="right")
        assert np.abs(np.asarray(cut["data"][0]["embedding"], np.float32) - want[0]).max() <= 1e-5
        assert cut["usage"]["prompt_tokens"] == 32  # counted as cut
        error = post(srv.url, srv.model, ["a"] * 5).json()["error"]  # more than the queue: a request that never fits
        assert error["param"] == "input" and "4" in error["message"]

        texts = [LONG[i % 8][: 120 + 9 * i] for i in range(48)]
        reference = embedder.encode(texts, "moee-sum", normalize=True, max_length=32, truncation="right")
        barrier = threading.Barrier(24)

        def one(i):
            barrier.wait(timeout=30)
            return i, post(srv.url, srv.model, texts[2 * (i % 24): 2 * (i % 24) + 2])

        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(one, range(24)))
        statuses = [r.status_code for _, r in results]
        assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
        for i, response in results:
            if response.status_code == 429:
                assert int(response.headers["Retry-After"]) >= 1
                assert response.json()["error"]["type"] == "rate_limit_error"
            else:
                got = np.asarray([d["embedding"] for d in response.json()["data"]], np.float32)
                assert np.abs(got - reference[2 * i: 2 * i + 2]).max() <= 1e-5
        assert httpx.get(srv.url + "/health").status_code == 200
        assert post(srv.url, srv.model, ["still here"]).status_code == 200
    finally:
        srv.stop()


def test_sigterm_under_load_finishes_accepted_and_refuses_new(model_dir):
    srv = ServerProcess(model_dir, "--dtype", "float32", "--max-batch-size", "1").check_ready()
    try:
        with ThreadPoolExecutor(12) as pool:
            accepted = [pool.submit(post, srv.url, srv.model, LONG[:4]) for _ in range(12)]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until all 48 inputs were accepted (queued or computed)
                if queued_inputs(srv.url) + metric(srv.url, "moee_inputs_total") >= 48:
                    break
                time.sleep(0.01)
            assert queued_inputs(srv.url) > 0, "the work finished before the signal: nothing left to drain"
            srv.signal(signal.SIGTERM)
            time.sleep(0.05)
            refused = post(srv.url, srv.model, ["new"])
            health = httpx.get(srv.url + "/health")
            answers = [f.result(timeout=120) for f in accepted]
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert health.status_code == 503
        assert [a.status_code for a in answers] == [200] * 12
        assert all(len(a.json()["data"]) == 4 for a in answers)
        assert srv.wait(30) == 0, srv.output
        assert "stopped" in srv.output
    finally:
        srv.stop()


def test_second_signal_exits_at_once(model_dir):
    srv = ServerProcess(model_dir, "--dtype", "float32", "--max-batch-size", "1", "--shutdown-timeout", "60").check_ready()
    try:
        with ThreadPoolExecutor(6) as pool:
            for _ in range(6):
                pool.submit(post, srv.url, srv.model, LONG, 120)
            deadline = time.monotonic() + 30
            while queued_inputs(srv.url) < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            srv.signal(signal.SIGINT)
            time.sleep(0.2)
            start = time.monotonic()
            srv.signal(signal.SIGINT)
            code = srv.wait(10)
        assert code == 128 + signal.SIGINT and time.monotonic() - start < 3, srv.output
        assert "again: exiting now" in srv.output
    finally:
        srv.stop()


def test_failed_batch_is_a_500_and_the_server_stays_up(tmp_path):
    directory = write_random_checkpoint(tmp_path / "nan", SMALL_CONFIGS["olmoe"], seed=23)
    for shard in directory.glob("*.safetensors"):
        tensors = load_file(shard)
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"][0] = float("nan")
            save_file(tensors, str(shard), metadata={"format": "pt"})
    srv = ServerProcess(directory, "--dtype", "float32").check_ready()
    try:
        for _ in range(2):
            response = post(srv.url, srv.model, ["a text", "another"])
            assert response.status_code == 500, response.text
            error = response.json()["error"]
            assert error["type"] == "server_error" and "numerical" in error["message"] and error["code"] == "batch_failed"
            assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/v1/models").status_code == 200
    finally:
        srv.stop()


def serve_command(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moee_ref.cli.main", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def test_port_in_use_is_one_line(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_command("--model", str(model_dir), "--port", str(port))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"moee serve: error: 127.0.0.1:{port} is already in use; stop the other "
                                                  "server or choose another --port"], result.stderr


def test_public_address_needs_a_key(model_dir):
    result = serve_command("--model", str(model_dir), "--host", "0.0.0.0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--api-key" in lines[0] and "--allow-unauthenticated" in lines[0], result.stderr
