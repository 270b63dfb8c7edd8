"""Dynamic batching on one worker thread.

Requests from many clients are split into their inputs and queued; the worker gathers the oldest input and the
queued inputs with the same settings into one batch, up to --max-batch-size inputs and --max-batch-tokens tokens
(as padded: inputs times the longest), and computes it while the event loop goes on answering. After a batch
that answered N requests, it waits up to --batch-wait-ms for N inputs before it starts the next: the clients it
just answered are likely to send again, and a batch started the moment one of them is back would leave the
others for a batch of their own (a lone client is never kept waiting: N is 1). A request larger
than a batch is split over several; it is answered when its last input is done. The queue is bounded in inputs:
a request that does not fit is refused at once (429), never left waiting.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from .errors import ApiError


@dataclass(eq=False)
class Job:
    """One request's work: its inputs, and the future its handler awaits (set from the worker thread)."""

    key: Hashable  # the settings of the computation; only inputs with equal keys share a batch
    inputs: list[Any]
    tokens: list[int]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    batchable: bool = True  # False: computed alone, all its inputs in one call (routing)
    results: list[Any] = field(default_factory=list)
    remaining: int = 0
    finished: bool = False  # answered, or its client gone: set on the worker side under the batcher's lock

    def __post_init__(self):
        self.results = [None] * len(self.inputs)
        self.remaining = len(self.inputs)

    @property
    def done(self) -> bool:
        return self.finished or self.future.done()

    def resolve(self, value=None, error: BaseException | None = None) -> None:
        def settle():
            if not self.future.done():
                if error is None:
                    self.future.set_result(value)
                else:
                    self.future.set_exception(error)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


@dataclass(eq=False)
class Item:
    job: Job
    index: int  # into job.inputs

    @property
    def tokens(self) -> int:
        return self.job.tokens[self.index]


class Batcher:
    """compute(key, inputs) -> list of results, one per input, called on the worker thread only."""

    def __init__(self, compute: Callable[[Hashable, list], list], *, max_batch_size: int, max_batch_tokens: int,
                 max_queue: int, batch_wait: float = 0.0, metrics=None, error_of: Callable[[Exception], ApiError] | None = None):
        self.compute = compute
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.batch_wait = batch_wait  # seconds
        self._expected = 0  # requests the last batch answered: inputs worth waiting for before the next one
        self.metrics = metrics
        self.error_of = error_of or (lambda exc: ApiError(500, f"the batch failed: {type(exc).__name__}: {exc}", code="batch_failed"))
        self._queue: deque[Item] = deque()
        self._cond = threading.Condition()
        self.queued_inputs = 0
        self.queued_tokens = 0
        self.pending_jobs = 0  # accepted and not yet answered
        self._closing = False
        self.died: BaseException | None = None
        self._tokens_per_second = None  # measured, for Retry-After
        self._thread = threading.Thread(target=self._run, name="moee-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.died is None and (self._thread.ident is None or self._thread.is_alive())  # not started yet counts

    # ------------------------------------------------------------ event loop side

    def submit(self, key: Hashable, inputs: list, tokens: list[int], *, batchable: bool = True) -> asyncio.Future:
        """Queue a request's inputs; its future gets the results in input order. 429 at once when they do not fit."""
        loop = asyncio.get_running_loop()
        job = Job(key, inputs, tokens, loop.create_future(), loop, batchable)
        with self._cond:
            if not self.alive:
                raise ApiError(503, "the worker has stopped; this server cannot compute (restart it)", code="worker_stopped")
            if self._closing:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if self.queued_inputs + len(inputs) > self.max_queue:
                raise ApiError(429, f"the server is overloaded: {self.queued_inputs} inputs are queued and the queue holds "
                               f"{self.max_queue} (--max-queue); retry later", code="overloaded",
                               headers={"Retry-After": str(self.retry_after())})
            self._queue.extend(Item(job, i) for i in range(len(inputs)))
            self.queued_inputs += len(inputs)
            self.queued_tokens += sum(tokens)
            self.pending_jobs += 1
            self._gauges()
            self._cond.notify()
        return job.future

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained, from the measured throughput (1 to 60)."""
        rate = self._tokens_per_second
        return 1 if not rate else max(1, min(60, math.ceil(self.queued_tokens / rate)))

    def close(self) -> None:
        """Accept nothing more; the worker finishes what is queued and ends."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ------------------------------------------------------------ worker side

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_inputs.set(self.queued_inputs)
            self.metrics.queue_tokens.set(self.queued_tokens)

    def _take(self) -> list[Item] | None:
        """The next batch (None: closing and nothing left). Inputs of answered jobs (failed, or the client gone)
        are dropped, not computed."""
        with self._cond:
            waited = False
            while True:
                while self._queue and self._queue[0].job.done:
                    item = self._queue.popleft()
                    self._drop(item)
                    self._finish(item.job)  # a client that went away: its job counts as answered
                if self._queue and waited:
                    break
                if self._queue:
                    wanted = min(self._expected, self.max_batch_size)
                    deadline = time.monotonic() + self.batch_wait
                    while self.queued_inputs < wanted and not self._closing:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    waited = True
                    continue  # the head may have gone meanwhile
                if self._closing:
                    return None
                self._cond.wait()
            head = self._queue[0]
            if not head.job.batchable:
                batch = [item for item in self._queue if item.job is head.job]
            else:
                batch, longest = [], 0
                for item in self._queue:
                    if len(batch) >= self.max_batch_size:
                        break
                    if item.job.done or not item.job.batchable or item.job.key != head.job.key:
                        continue
                    width = max(longest, item.tokens)
                    if batch and width * (len(batch) + 1) > self.max_batch_tokens:
                        break
                    batch.append(item)
                    longest = width
            taken = set(map(id, batch))
            rest = deque(item for item in self._queue if id(item) not in taken)
            self._queue = rest
            for item in batch:
                self._drop(item)
            self._gauges()
            return batch

    def _drop(self, item: Item) -> None:
        self.queued_inputs -= 1
        self.queued_tokens -= item.tokens

    def _run(self) -> None:
        batch: list[Item] = []
        try:
            while True:
                batch = self._take()
                if batch is None:
                    return
                self._compute(batch)
        except BaseException as exc:  # noqa: BLE001 (the worker is gone: say so to everyone waiting)
            self.died = exc
            with self._cond:
                items, self._queue = (batch or []) + list(self._queue), deque()
                self.queued_inputs = self.queued_tokens = 0
            error = ApiError(503, f"the worker stopped ({type(exc).__name__}); this server cannot compute (restart it)",
                             code="worker_stopped")
            for job in {id(item.job): item.job for item in items}.values():
                self._finish(job, error=error)
            if self.metrics is not None:
                self.metrics.worker_alive.set(0)

    def _compute(self, batch: list[Item]) -> None:
        jobs = {id(item.job): item.job for item in batch}
        key = batch[0].job.key
        tokens = sum(item.tokens for item in batch)
        start = time.perf_counter()
        try:
            results = self.compute(key, [item.job.inputs[item.index] for item in batch])
        except Exception as exc:  # noqa: BLE001 (a failed batch fails its requests, not the server)
            error = self.error_of(exc)
            for job in jobs.values():
                self._finish(job, error=error)
            return
        finally:
            seconds = time.perf_counter() - start
            if self.metrics is not None:
                self.metrics.observe_batch(len(batch), tokens, seconds)
        if seconds > 0 and tokens:
            rate = tokens / seconds
            self._tokens_per_second = rate if self._tokens_per_second is None else 0.8 * self._tokens_per_second + 0.2 * rate
        self._expected = len(jobs)
        for item, result in zip(batch, results):
            job = item.job
            job.results[item.index] = result
            job.remaining -= 1
            if job.remaining == 0:
                self._finish(job, value=job.results)

    def _finish(self, job: Job, value=None, error: BaseException | None = None) -> None:
        with self._cond:
            if job.finished:
                return
            job.finished = True
            self.pending_jobs -= 1
        job.resolve(value, error)
