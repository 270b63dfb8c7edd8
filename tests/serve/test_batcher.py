"""The batcher alone (no HTTP): batches by count and padded tokens, a failed batch fails only its requests,
and a dead worker makes the server unhealthy (503) instead of hanging its clients."""

from __future__ import annotations

import asyncio

import pytest

from serve_fixtures import require

require("starlette", "uvicorn", "prometheus_client", "httpx")

from moee_ref.serve.batcher import Batcher  # noqa: E402
from moee_ref.serve.errors import ApiError  # noqa: E402


class Recorder:
    def __init__(self, fail_on=None, die_on=None):
        self.batches = []
        self.fail_on, self.die_on = fail_on, die_on

    def __call__(self, key, inputs):
        self.batches.append((key, list(inputs)))
        if self.die_on in inputs:
            raise SystemExit("worker killed")
        if self.fail_on in inputs:
            raise ArithmeticError("boom")
        return [f"{key}:{x}" for x in inputs]


def run(batcher: Batcher, jobs):
    async def main():
        futures = []
        for key, inputs, tokens in jobs:
            futures.append(batcher.submit(key, inputs, tokens))
        batcher.start()  # after queueing everything, so that the batches are formed from all of it
        return await asyncio.gather(*futures, return_exceptions=True)

    try:
        return asyncio.run(main())
    finally:
        batcher.close()
        batcher.join(5)


def test_batches_by_count_tokens_and_key():
    rec = Recorder()
    batcher = Batcher(rec, max_batch_size=3, max_batch_tokens=100, max_queue=100)
    results = run(batcher, [("a", [1, 2], [10, 10]), ("b", [3], [10]), ("a", [4, 5, 6, 7], [10, 10, 60, 10]), ("a", [8], [200])])
    assert results == [["a:1", "a:2"], ["b:3"], ["a:4", "a:5", "a:6", "a:7"], ["a:8"]]
    assert rec.batches[0] == ("a", [1, 2, 4])  # the oldest input and the next ones with its settings, over requests
    assert sorted(x for _, b in rec.batches for x in b) == list(range(1, 9))  # each input computed once
    for key, inputs in rec.batches:
        tokens = {1: 10, 2: 10, 3: 10, 4: 10, 5: 10, 6: 60, 7: 10, 8: 200}
        assert len(inputs) <= 3
        assert len(inputs) == 1 or len(inputs) * max(tokens[i] for i in inputs) <= 100  # padded budget; one long input runs alone


def test_failed_batch_fails_only_its_requests():
    rec = Recorder(fail_on="bad")
    batcher = Batcher(rec, max_batch_size=2, max_batch_tokens=100, max_queue=100)
    results = run(batcher, [("k", ["bad", "x"], [1, 1]), ("k", ["y", "z"], [1, 1])])
    assert isinstance(results[0], ApiError) and results[0].status == 500 and "boom" in results[0].message
    assert results[1] == ["k:y", "k:z"]
    assert batcher.pending_jobs == 0


def test_full_queue_is_a_429_at_once():
    batcher = Batcher(Recorder(), max_batch_size=2, max_batch_tokens=100, max_queue=3)

    async def main():
        batcher.submit("k", [1, 2], [1, 1])
        with pytest.raises(ApiError) as caught:
            batcher.submit("k", [3, 4], [1, 1])
        return caught.value

    error = asyncio.run(main())
    assert error.status == 429 and int(error.headers["Retry-After"]) >= 1


def test_dead_worker_answers_503_and_health_fails(tmp_path):
    from starlette.testclient import TestClient

    from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint
    from moee_ref.embedding.embedder import MoEEmbedder
    from moee_ref.serve.app import ServeConfig, Service, build_app

    directory = write_random_checkpoint(tmp_path / "m", SMALL_CONFIGS["olmoe"], seed=24)
    service = Service(MoEEmbedder.from_pretrained(directory, dtype="float32"), ServeConfig(model_name="m"))

    def die(key, inputs):
        raise SystemExit("the worker thread ends")

    service.batcher.compute = die
    service.batcher.start()
    try:
        with TestClient(build_app(service)) as client:
            assert client.get("/health").status_code == 200
            response = client.post("/v1/embeddings", json={"model": "m", "input": "a"})
            assert response.status_code == 503 and response.json()["error"]["code"] == "worker_stopped"
            assert client.get("/health").status_code == 503
            assert client.post("/v1/embeddings", json={"model": "m", "input": "a"}).status_code == 503
            assert "moee_worker_alive 0.0" in client.get("/metrics").text
    finally:
        service.batcher.close()


def test_waits_for_the_clients_it_answered():
    """After a batch that answered 3 requests, the next batch waits (up to batch_wait) for 3 inputs: clients
    that come back a few ms apart share one batch instead of the first going alone."""
    rec = Recorder()
    batcher = Batcher(rec, max_batch_size=8, max_batch_tokens=1000, max_queue=100, batch_wait=2.0)

    async def main():
        first = [batcher.submit("k", [i], [1]) for i in range(3)]
        batcher.start()
        await asyncio.gather(*first)
        again = []
        for i in range(3, 6):
            again.append(batcher.submit("k", [i], [1]))
            await asyncio.sleep(0.02)
        return await asyncio.gather(*again)

    try:
        assert asyncio.run(main()) == [["k:3"], ["k:4"], ["k:5"]]
    finally:
        batcher.close()
        batcher.join(5)
    assert [b for _, b in rec.batches] == [[0, 1, 2], [3, 4, 5]]
