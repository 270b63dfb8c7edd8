"""The corpus job on Ray Data, on one machine or a cluster (optional extra: pip install 'moee-ref[distributed]').

    ds = embed_dataset(ray.data.read_parquet("docs/"), "allenai/OLMoE-1B-7B-0924", kind="moee-sum", workers=8)
    ds.write_parquet("embeddings/")                 # Ray Data's writers; or gather() into one array in input order

The model is loaded once per actor (a callable-class UDF on an actor pool of `workers` actors, each with
`cpus_per_worker` CPUs and as many torch threads); each batch of rows goes through MoEEmbedder.encode.
A worker that dies is restarted by Ray and its batch run again; gather() checks that every row came back
exactly once. Every node needs the model: a hub id (downloaded on each) or a path present on every node.

What differs from the local job (corpus.py): a batch's texts are sorted and padded among themselves, not
among the whole corpus, so vectors equal the local job's within float32 rounding (see the README's
determinism note), not bit for bit; alpha='auto' (chosen over the whole corpus) and the official mode
(standardised per batch of the input order) are refused; there is no --resume, Ray retries failed work.
"""

from __future__ import annotations

import logging
import re
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import errors
from ..errors import InputError, MissingExtraError, MoEERefError

MISSING_RAY = "needs the optional ray[data] package: pip install 'ray[data]' (in a clone of moee-ref: pip install -e '.[distributed]')"
RAY_PROBE_SECONDS = 5.0  # how long a --ray-address may take to accept a connection
ROWS_PER_TASK = 8  # model batches per Ray batch: fewer tasks to schedule, at most this much work redone after a death


class RayAddressError(MoEERefError):
    """--ray-address names no Ray cluster that answers."""


def require_ray(purpose: str = "--engine ray") -> None:
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingExtraError(f"{purpose} {MISSING_RAY}") from None


class EmbedBatches:
    """The actors' UDF: the model is loaded once, in the constructor; each call embeds one batch of rows with the
    pipeline (embedding/pipeline.py) and `spec`. errors_as_rows: an expected error of a batch (MoEERefError) comes
    back in an `error` column, for gather() to raise, instead of as Ray's traceback. Subclass it to change what a
    batch gives (embed_dataset's udf=)."""

    def __init__(self, model: str, *, threads: int, text_column: str, output_column: str, spec, batch_size: int,
                 embedder_options: dict, standardizer_paths: Sequence[str] | None = None, errors_as_rows: bool = False):
        import torch

        from ..embedding.embedder import MoEEmbedder
        from ..embedding.standardize import Standardizer

        torch.set_num_threads(threads)  # as many as the actor's CPUs: more would contend with its neighbours
        self.embedder = MoEEmbedder.from_pretrained(model, **embedder_options)
        self.text_column, self.output_column, self.batch_size = text_column, output_column, batch_size
        self.errors_as_rows = errors_as_rows
        if standardizer_paths:  # read from their files on each node
            spec = spec.replace(standardizers=[Standardizer.load(p) for p in standardizer_paths])
        self.spec = spec

    def embed(self, texts: list[str]) -> np.ndarray:
        from ..embedding import pipeline

        return pipeline.run(self.embedder, texts, self.spec, batch_size=self.batch_size, show_progress_bar=False).vectors

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch[self.text_column]]
        if not self.errors_as_rows:
            batch[self.output_column] = self.embed(texts)
            return batch
        # Ray passes a UDF's exception back as a UserCodeException without it, as a traceback: an expected error (a
        # bad text, non-finite outputs) comes back in an `error` column instead, its text indices those of the corpus.
        try:
            batch[self.output_column] = self.embed(texts)
            batch["error"] = np.full(len(texts), "", dtype=object)
        except MoEERefError as exc:
            ids = batch["id"]
            message = re.sub(r"index (\d+)", lambda m: f"index {int(ids[int(m[1])])}", str(exc))
            batch[self.output_column] = np.zeros((len(texts), self.embedder.dimension(self.spec.kind, self.spec.rw_layers)),
                                                 np.float32)
            batch["error"] = np.full(len(texts), f"{type(exc).__name__}: {message}", dtype=object)
        return batch


def embed_dataset(data, model: str, *, kind: str = "moee-sum", text_column: str = "text", output_column: str = "embedding",
                  workers: int = 1, cpus_per_worker: int = 1, gpus_per_worker: float = 0, batch_size: int = 16,
                  dtype: str = "auto", int8: bool = False, share_prefix: bool = True, prompt: str | None = None,
                  alpha: float = 1.0, normalize: bool = False, standardizer_paths: Sequence[str] | None = None,
                  udf=EmbedBatches, udf_kwargs: dict | None = None, spec=None, **feature_options):
    """A ray.data.Dataset with an `output_column` of float32 vectors beside the input's columns.

    data: a ray.data.Dataset, or a path (or list of paths) of .parquet, .csv, .jsonl or text files (a text
    file's lines are its rows, in column "text"). spec: an EmbedSpec (embedding/spec.py), or None for the one
    kind, prompt, alpha, normalize and the feature options make. udf: EmbedBatches or a subclass, given
    udf_kwargs besides EmbedBatches' own. The other keywords are from_pretrained()'s."""
    require_ray("embed_dataset")
    import ray.data

    from ..embedding.spec import EmbedSpec

    if spec is None:
        spec = EmbedSpec(kind=kind, prompt=prompt, alpha=alpha, normalize=normalize, **feature_options)
    spec.check()
    if spec.alpha == "auto":
        raise InputError("alpha='auto' is chosen over the whole corpus; on Ray give a number (moee embed's local job takes auto)")
    if spec.official:
        raise InputError("the official mode standardises per batch of the input order; on Ray use the default mode")
    if not isinstance(data, ray.data.Dataset):
        data = read_dataset(data)
    return data.map_batches(
        udf,
        fn_constructor_kwargs={
            "model": str(model), "threads": cpus_per_worker, "text_column": text_column, "output_column": output_column,
            "spec": spec, "batch_size": batch_size,
            "embedder_options": {"dtype": dtype, "int8": int8, "share_prefix": share_prefix},
            "standardizer_paths": list(standardizer_paths or []), **(udf_kwargs or {}),
        },
        batch_size=batch_size * ROWS_PER_TASK, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
        # Nothing to ask for a dead worker: Ray Data restarts an actor pool's actors and retries the batch one held
        # (max_restarts and max_task_retries default to -1 there); its output never counted.
    )


def read_dataset(paths):
    import ray.data

    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    suffixes = {Path(p).suffix.lower() for p in items}
    if len(suffixes) != 1:
        raise InputError(f"give files of one kind (.parquet, .csv, .jsonl or text), got {', '.join(sorted(suffixes))}")
    suffix, items = suffixes.pop(), [str(p) for p in items]
    if suffix == ".parquet":
        return ray.data.read_parquet(items)
    if suffix == ".csv":
        return ray.data.read_csv(items)
    if suffix == ".jsonl":
        return ray.data.read_json(items, lines=True)
    return ray.data.read_text(items)


def texts_dataset(texts: list[str], blocks: int):
    """The texts as a Dataset with an `id` column (the row's index), split into `blocks` blocks for the workers."""
    import pyarrow as pa
    import ray.data

    # One table per block, not a repartition: that is a task of its own, which waits for CPUs the actors hold.
    bounds = np.linspace(0, len(texts), max(1, min(blocks, len(texts))) + 1).astype(int)
    return ray.data.from_arrow([
        pa.table({"id": np.arange(a, b, dtype=np.int64), "text": pa.array(texts[a:b], pa.string())}) for a, b in zip(bounds, bounds[1:])
    ])


def gather(dataset, rows: int, output_column: str = "embedding") -> np.ndarray:
    """The vectors of a Dataset with an `id` column as one float32 array in id order, checking that every id
    in range(rows) came back exactly once (a retried batch must not count twice, a lost one must not pass)."""
    vectors, seen = None, np.zeros(rows, bool)
    failures = []
    for batch in dataset.iter_batches(batch_format="numpy", batch_size=None):
        ids = np.asarray(batch["id"], np.int64)
        if "error" in batch and any(batch["error"]):
            failures.append((int(ids.min()), next(e for e in batch["error"] if e)))
            continue
        block = np.asarray(batch[output_column], np.float32)
        if vectors is None:
            vectors = np.zeros((rows, block.shape[1]), np.float32)
        if ids.size and (ids.min() < 0 or ids.max() >= rows):
            raise MoEERefError(f"the Ray job returned row id {int(ids.max() if ids.max() >= rows else ids.min())}, outside 0..{rows - 1}")
        if seen[ids].any() or len(np.unique(ids)) != len(ids):
            raise MoEERefError(f"the Ray job returned row {int(ids[seen[ids]][0]) if seen[ids].any() else int(ids[0])} twice; nothing was written")
        seen[ids] = True
        vectors[ids] = block
    if failures:  # the first batch's in input order, as the local job names the first bad text
        name, _, message = min(failures)[1].partition(": ")
        kind = getattr(errors, name, None)
        raise (kind if isinstance(kind, type) and issubclass(kind, MoEERefError) else MoEERefError)(message)
    if not seen.all():
        missing = np.flatnonzero(~seen)
        raise MoEERefError(f"the Ray job returned no vector for {missing.size} rows (first: {int(missing[0])}); nothing was written")
    return vectors if vectors is not None else np.zeros((0, 0), np.float32)


def check_address(address: str) -> None:
    """A clear error within RAY_PROBE_SECONDS when nothing accepts a connection at host:port (ray.init would
    otherwise retry for a minute or more). 'auto' and addresses without a port are left to Ray."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=RAY_PROBE_SECONDS).close()
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise RayAddressError(
            f"no Ray cluster answers at {address} ({reason} within {RAY_PROBE_SECONDS:g} s); check the address "
            "(`ray start --head` prints it), or drop --ray-address to run on a local Ray runtime"
        ) from None


@contextmanager
def ray_runtime(address: str | None, num_cpus: int, show_progress: bool):
    """An existing cluster (address), or a local Ray runtime started here and shut down afterwards."""
    require_ray()
    import ray

    if address:
        check_address(address)
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = show_progress
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-operator INFO lines are not this command's output
    try:
        yield
    finally:
        ray.shutdown()
