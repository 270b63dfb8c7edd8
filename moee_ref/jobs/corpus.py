"""Corpus jobs that survive interruption: the work is saved chunk by chunk beside the output, and resumed.

    OUTPUT.parts/manifest.json     what the job is: model identity, every option that changes a vector,
                                   a digest of the input texts, the rows, what a chunk holds
    OUTPUT.parts/chunk-S-E.npy     the rows at positions S..E-1 of the job's order, float32
    OUTPUT.parts/chunk-S-E.json    that file's sha256 and shape, written after it: a chunk without one, or
                                   whose bytes no longer match it, is computed again

The job's order is the order features() batches a corpus in (longest first, MoEEmbedder.corpus_order), or
the input order in the official mode. Every chunk starts and ends on a batch boundary of that order, so it
runs the very batches one encode() of the whole corpus runs: the chunk size changes no vector, chunks may
differ in size, and a resumed job writes the bytes an uninterrupted one writes. The default mode's chunks
hold the features (HS and RW); the vectors are made from all of them at the end, since alpha='auto' is
chosen over the whole corpus. The official mode's chunks hold the vectors (its standardisation is per batch).

Every file is written under a temporary name, flushed to disk and renamed. The output appears, by rename,
only when complete; then the parts directory is removed.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError, NumericalError, Stopped
from ..io.outputs import check_output_path
from ..progress import show_progress as wants_progress

MANIFEST_FORMAT, MANIFEST_VERSION = "moee-ref corpus job", 1
# The automatic chunk size aims at this much work per chunk: what an interruption can lose at most.
CHUNK_SECONDS = 120.0
# In the layer-streamed mode every chunk reads all the weights again: the automatic size also aims at
# STREAMED_PASSES times the first chunk's time (one batch, so about one pass over the layers), which keeps
# the re-reading under about 1/STREAMED_PASSES of the job.
STREAMED_PASSES = 4
MAX_GROWTH = 4  # a chunk is at most this many times the previous one: one timing hiccup costs little
CHUNK_NAME = re.compile(r"chunk-(\d{9})-(\d{9})\.json")
# Keys of the manifest that must match for a resume, and how a difference is named.
IDENTITY_KEYS = {"model": "the model", "input": "the input texts", "settings": "the options"}


class ResumeError(InputError):
    """A parts directory that does not fit this job: from another job, another model, other options or input."""


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 of the texts in order, each length-prefixed (so that no two lists give the same bytes)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def model_identity(directory) -> dict:
    from ..loading.identity import checkpoint_identity

    name, revision = checkpoint_identity(directory)
    return {"name": name, "revision": revision}


@dataclass
class Chunk:
    start: int  # positions in the job's order
    end: int


class CorpusJob:
    """One `moee embed` job: its parts directory, manifest and chunks. Opening it applies the rules:
    without resume an existing parts directory is refused (it holds someone's unfinished work); with
    resume a missing or foreign one is. Nothing is created until start()."""

    def __init__(self, output, *, resume: bool, chunk_size: int | None = None, log=None):
        self.output = check_output_path(output)  # a symlink's target: the parts lie beside what gets replaced
        self.parts = parts_dir(self.output)
        self.resume = resume
        self.chunk_size = chunk_size
        self.log = log or (lambda message: print(f"moee embed: {message}", file=sys.stderr))
        self.manifest: dict | None = None
        self.done_rows = self.resumed_rows = 0
        self.created = False  # by this process: removed again if it ends with nothing saved
        self.started = False  # past every check: the work began
        self._lock = None
        if resume:
            if not self.parts.exists():
                raise ResumeError(
                    f"--resume: there is no unfinished job for {output} ({self.parts} does not exist); "
                    "run without --resume to start one"
                )
            self._take_lock()
            self.manifest = self._read_manifest()
            # The output's temporary file of a run killed while writing it (outputs.atomic_path): this job's, since
            # the lock is held by whoever runs it.
            for stale in self.output.parent.glob(f".{glob.escape(self.output.name)}.*.partial"):
                stale.unlink(missing_ok=True)
        elif self.parts.exists():
            raise ResumeError(
                f"{self.parts} holds an unfinished job for {output}: pass --resume to continue it, "
                f"or remove {self.parts} to start again"
            )

    # ---------------------------------------------------------------- manifest

    def _read_manifest(self) -> dict:
        path = self.parts / "manifest.json"
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ResumeError(f"{self.parts} has no manifest.json, so it is no job moee embed wrote; remove it and run without --resume") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ResumeError(f"{path} is unreadable or not valid JSON ({exc}); remove {self.parts} and run without --resume") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise ResumeError(f"{path} is not a moee embed job manifest; remove {self.parts} and run without --resume")
        if manifest.get("version") != MANIFEST_VERSION:
            raise ResumeError(
                f"{path} is of job format version {manifest.get('version')!r}, this moee-ref reads version {MANIFEST_VERSION}; "
                f"finish it with the moee-ref that started it, or remove {self.parts}"
            )
        if manifest.get("output") != str(self.output.resolve()):
            raise ResumeError(
                f"{path} belongs to the job writing {manifest.get('output')}, not {self.output.resolve()}; "
                f"resume that job there, or remove {self.parts}"
            )
        return manifest

    def check(self, identity: dict) -> None:
        """On resume, refuse a job that differs from the saved one in any key of `identity`, naming each difference.
        Called twice: before the model is loaded (model files, input, options) and after (what loading decided)."""
        if self.manifest is None:
            return
        differences = []
        for key, value in identity.items():
            saved = self.manifest.get(key)
            if isinstance(value, dict) and isinstance(saved, dict):
                for name in sorted(set(value) | set(saved)):
                    if value.get(name) != saved.get(name):
                        differences.append(f"{key}.{name} is {_shown(value.get(name))} here, {_shown(saved.get(name))} in the saved job")
            elif value != saved:
                differences.append(f"{key} is {_shown(value)} here, {_shown(saved)} in the saved job")
        if differences:
            raise ResumeError(
                f"--resume refused: this command differs from the job saved in {self.parts}: {'; '.join(differences)}. "
                f"Resume with the job's own command, or remove {self.parts} to start again"
            )

    def start(self, identity: dict, rows: int, stores: str, width: int) -> None:
        """Create the parts directory and its manifest (a new job), or check a resumed one's layout."""
        layout = {"rows": rows, "stores": stores, "width": width}
        self.started = True
        if self.manifest is not None:
            self.check(layout)  # the same identity gives the same layout; a difference means a damaged manifest
            return
        self.parts.mkdir()
        self.created = True
        self._take_lock()
        self.manifest = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "output": str(self.output.resolve()),
            **identity, **layout, "chunk_size": self.chunk_size or "auto",
        }
        _write_atomic(self.parts / "manifest.json", (json.dumps(self.manifest, indent=1) + "\n").encode())

    def _take_lock(self) -> None:
        """One process per job: a second one (the same command started twice) would compute every chunk twice."""
        handle = open(self.parts / ".lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ResumeError(f"another moee embed is running the job in {self.parts}; wait for it to end, or stop it first") from None
        self._lock = handle

    # ---------------------------------------------------------------- chunks

    def saved_chunks(self) -> list[Chunk]:
        """The chunks whose files match their checksums, in order; damaged and unfinished ones are removed."""
        width, rows = self.manifest["width"], self.manifest["rows"]
        chunks, covered_to = [], {}
        for path in sorted(self.parts.iterdir()):
            if path.name.endswith(".partial"):  # a write that was cut off
                path.unlink()
                continue
            match = CHUNK_NAME.fullmatch(path.name)
            if not match:
                continue
            start, end = int(match[1]), int(match[2])
            data = path.with_suffix(".npy")
            if not 0 <= start < end <= rows or _load_verified(data, path, (end - start, width)) is None:
                self.log(f"{data.name} in {self.parts} is damaged or incomplete (its checksum or shape does not match): "
                         f"computing its {end - start} rows again")
                path.unlink()
                data.unlink(missing_ok=True)
                continue
            chunks.append(Chunk(start, end))
            covered_to[start] = end
        names = {f"chunk-{c.start:09d}-{c.end:09d}{ext}" for c in chunks for ext in (".npy", ".json")}
        for path in self.parts.glob("chunk-*.npy"):
            if path.name not in names:  # saved, but killed before its checksum was: unverifiable
                path.unlink()
        # Chunks never overlap unless files were copied in from elsewhere: keep the first of any overlap.
        kept, end = [], 0
        for chunk in sorted(chunks, key=lambda c: c.start):
            if chunk.start >= end:
                kept.append(chunk)
                end = chunk.end
        return kept

    def save_chunk(self, chunk: Chunk, array: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array, np.float32), allow_pickle=False)
        data = buffer.getvalue()
        base = self.parts / f"chunk-{chunk.start:09d}-{chunk.end:09d}"
        _write_atomic(base.with_suffix(".npy"), data)
        record = {"sha256": hashlib.sha256(data).hexdigest(), "shape": list(array.shape)}
        _write_atomic(base.with_suffix(".json"), (json.dumps(record) + "\n").encode())

    def load_chunk(self, chunk: Chunk) -> np.ndarray | None:
        base = self.parts / f"chunk-{chunk.start:09d}-{chunk.end:09d}"
        return _load_verified(base.with_suffix(".npy"), base.with_suffix(".json"), (chunk.end - chunk.start, self.manifest["width"]))

    def saved_rows(self) -> int:
        names = (CHUNK_NAME.fullmatch(path.name) for path in self.parts.glob("chunk-*.json")) if self.parts.is_dir() else ()
        return sum(int(m[2]) - int(m[1]) for m in names if m)

    def stopped_detail(self) -> str:
        """What a stop leaves, for the last line the command prints; a new job with nothing saved is removed."""
        if self.manifest is None or (self.created and not self.saved_rows()):
            if self.created:
                self.remove()
            return "nothing was left half-written"
        self.close()
        saved, rows = self.saved_rows(), self.manifest["rows"]
        if saved == rows:
            return f"all {rows} rows are saved in {self.parts}: the same command with --resume writes the output"
        return f"{saved} of {rows} rows are saved in {self.parts}: run the same command with --resume to continue"

    def failed(self, note: bool = True) -> None:
        """After an error: a job this process started and saved nothing of is removed; saved work is kept and said
        (note=False: the error said how to go on already)."""
        if self.created and not self.saved_rows():
            self.remove()
        elif note and self.started and self.parts.is_dir() and self.saved_rows():  # not after a refusal: nothing ran
            self.log(f"note: {self.saved_rows()} of {self.manifest['rows']} rows are saved in {self.parts}; "
                     "after fixing the cause, run the same command with --resume")
        self.close()

    def remove(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        shutil.rmtree(self.parts, ignore_errors=True)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ---------------------------------------------------------------- running

    def run(self, rows: int, batch_size: int, compute: Callable[[int, int], np.ndarray], *, streamed: bool = False,
            show_progress: bool = False) -> list[np.ndarray]:
        """Compute every chunk not yet saved, saving each as it completes; return all chunks' arrays in order.

        compute(start, end, tick) gives the array of the rows at positions start..end-1. A first SIGINT, SIGTERM or
        SIGHUP stops after the chunk in flight is saved; a second one stops at once (that chunk is lost)."""
        saved = self.saved_chunks()
        self.done_rows = self.resumed_rows = done = sum(c.end - c.start for c in saved)
        if self.resume:
            self.log(f"resuming: {done} of {rows} rows are saved in {self.parts} ({len(saved)} chunks)")
        batches = lambda start, end: -(-(end - start) // batch_size)  # noqa: E731
        bar = _bar(show_progress, batches(0, rows), sum(batches(c.start, c.end) for c in saved))
        sizer = _ChunkSizer(batch_size, self.chunk_size, streamed)
        try:
            with _finish_chunk_first(self.log) as stop:
                for gap_start, gap_end in _gaps(saved, rows):
                    start = gap_start
                    while start < gap_end:
                        end = min(gap_end, start + sizer.next())
                        began = time.perf_counter()
                        ticked = [0]

                        def tick(n: int) -> None:  # a batch done inside the chunk: the bar moves now
                            ticked[0] += n
                            if bar is not None:
                                bar.update(n)

                        array = compute(start, end, tick)
                        self.save_chunk(Chunk(start, end), array)
                        sizer.took(end - start, time.perf_counter() - began)
                        self.done_rows = done = done + end - start
                        if bar is not None and batches(start, end) > ticked[0]:
                            bar.update(batches(start, end) - ticked[0])
                        start = end
                        if stop.signum is not None and done < rows:
                            raise KeyboardInterrupt() if stop.signum == signal.SIGINT else Stopped(stop.signum)
        finally:
            if bar is not None:
                bar.close()
        arrays = []
        for chunk in self.saved_chunks():
            array = self.load_chunk(chunk)
            if array is None:  # damaged since it was checked a moment ago: nothing to trust on this disk
                raise InputError(f"a chunk in {self.parts} changed while it was read; check the disk, then rerun with --resume")
            arrays.append((chunk, array))
        if sum(c.end - c.start for c, _ in arrays) != rows:
            raise InputError(f"the chunks in {self.parts} do not cover all {rows} rows; rerun with --resume to compute the rest")
        return [array for _, array in arrays]


class _ChunkSizer:
    """Rows per chunk: --chunk-size, or sized from the time the previous chunk took. The first chunk is one
    batch. Texts come longest first, so a chunk sized at the rate of the one before it takes no longer."""

    def __init__(self, batch_size: int, fixed: int | None, streamed: bool):
        self.batch_size, self.fixed, self.streamed = batch_size, fixed, streamed
        self.rows, self.target = batch_size, CHUNK_SECONDS

    def next(self) -> int:
        return self.fixed or self.rows

    def took(self, rows: int, seconds: float) -> None:
        if self.fixed:
            return
        if self.streamed and self.rows == self.batch_size and rows == self.batch_size:
            self.target = max(CHUNK_SECONDS, STREAMED_PASSES * seconds)
        wanted = min(rows * self.target / max(seconds, 1e-3), MAX_GROWTH * rows)
        self.rows = max(self.batch_size, int(wanted) // self.batch_size * self.batch_size)


def _gaps(saved: list[Chunk], rows: int) -> list[tuple[int, int]]:
    gaps, position = [], 0
    for chunk in saved:
        if chunk.start > position:
            gaps.append((position, chunk.start))
        position = max(position, chunk.end)
    if position < rows:
        gaps.append((position, rows))
    return gaps


class _StopRequest:
    signum: int | None = None


@contextmanager
def _finish_chunk_first(log):
    """The first stop signal is noted (the loop stops after saving the chunk in flight); a second one stops
    at once, as stop_signals_unwind does. A signal the caller ignores (nohup) stays ignored."""
    request = _StopRequest()
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def handler(signum, frame):
        if request.signum is not None:
            for sig in signals:
                signal.signal(sig, signal.SIG_IGN)  # the cleanup that follows is not cut short
            raise KeyboardInterrupt() if signum == signal.SIGINT else Stopped(signum)
        request.signum = signum
        log(f"{signal.Signals(signum).name}: stopping once the chunk in flight is saved (send it again to stop now and lose that chunk)")

    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig, old in previous.items():
        if old is not signal.SIG_IGN:
            signal.signal(sig, handler)
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _bar(show: bool, total: int, initial: int):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="embedding", unit="batch")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write, flush to disk and rename: after a crash the file is there whole or not at all."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_verified(data_path: Path, record_path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The chunk's array if its bytes match the recorded sha256 and its shape is the one expected, else None."""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        data = data_path.read_bytes()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("sha256") != hashlib.sha256(data).hexdigest():
        return None
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError:
        return None
    if array.dtype != np.float32 or array.shape != shape:
        return None
    return array


def _shown(value) -> str:
    return json.dumps(value)


def disk_needed(rows: int, width: int, texts: int, dim: int, fmt: str, text_bytes: int) -> int:
    """Bytes the job writes at its peak: every chunk, and the output beside them before they are removed."""
    chunks = rows * width * 4
    output = {"npy": texts * dim * 4, "parquet": texts * (dim * 4 + 80),
              "jsonl": texts * (dim * 22 + 40) + text_bytes}[fmt]  # a float as JSON text: about 22 characters
    return chunks + output


def check_disk(path: Path, needed: int) -> None:
    free = shutil.disk_usage(path).free
    if needed > free:
        raise InputError(
            f"not enough free space for {path}: the job writes about {_size(needed)} (its chunks and the output), "
            f"the disk has {_size(free)} free; free some space or write the output elsewhere"
        )


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


# ---------------------------------------------------------------------------- the local engine


def embed_corpus(texts: Sequence[str], spec, *, source, load: Callable[[], object], output, fmt: str, batch_size: int,
                 resume: bool = False, chunk_size: int | None = None, whole_prompts: bool = False,
                 show_progress: bool | None = None, log=None, records=None, on_error: str = "fail",
                 save_config=None, memory_limit=None):
    """The vectors of `spec` (embedding/spec.py) for a corpus, written to `output` in `fmt` ("-": standard output),
    as a resumable job: chunks saved beside the output as they complete (CorpusJob), --resume continuing them.
    Returns the pipeline's Result; its report's `skipped` lists the rows left out.

    source: the model as given (checked against a resumed job before it is loaded); load(): the embedder.
    whole_prompts: the embedder runs every prompt whole (no shared prefix), recorded with the settings.
    records: the input's io.inputs.Records (ids, kept fields, where each row is; default: the texts alone).
    on_error: "fail" (the first bad row stops the job, named as the input counts it) or "skip" (bad rows left
    out, listed in OUTPUT.errors.jsonl). save_config: a path for the embedding configuration, alpha as used.
    Everything that can be checked from the options, the rows and the model's dimensions is, before any compute."""
    from ..embedding import pipeline
    from ..embedding.kinds import get_kind
    from ..io.inputs import Records
    from ..kernels.int8 import int8_matmuls

    spec = spec.check()
    log = log or (lambda message: print(f"moee embed: {message}", file=sys.stderr))
    if chunk_size is not None and chunk_size % batch_size:
        raise InputError(f"--chunk-size {chunk_size} is not a multiple of --batch-size {batch_size} (a chunk is whole batches)")
    if records is None:
        records = Records("texts", "text", list(texts), list(range(len(texts))), [f"line {i + 1}" for i in range(len(texts))])
    if on_error not in ("fail", "skip"):
        raise InputError(f"on_error={on_error!r} is not valid; choose 'fail' or 'skip'")
    to_stdout = str(output) == "-"
    if to_stdout and resume:
        raise InputError("--resume continues a job saved beside its output file; --output - has none: write to a file to resume")
    pipeline.check_auto_alpha_texts(spec, records.texts)  # before the model is loaded
    scratch = tempfile.TemporaryDirectory(prefix="moee-embed-") if to_stdout else None
    job_output = Path(scratch.name) / "stdout.out" if to_stdout else output
    job = CorpusJob(job_output, resume=resume, chunk_size=chunk_size, log=log)  # the output checked before hours of work
    try:
        embedder = None
        settings = {**spec.identity(), "batch_size": batch_size, "whole_prompts": whole_prompts}
        if not spec.official:  # the official mode's settings are its own (no feature options)
            for name in ("instruction", "ensemble"):
                settings.pop(name)
        settings["standardizer"] = settings.pop("standardizers")
        settings["on_error"] = on_error
        identity = {"input": {"texts": len(records.texts), "sha256": texts_digest(records.texts)}, "settings": settings}
        if job.manifest is not None:  # a resume: another model, input or options refused before the model is loaded
            from ..loading.checkpoint import resolve_source

            job.check({"model": model_identity(resolve_source(source)), **identity})
        embedder = load()
        model = embedder.model
        check_standardizer_widths(embedder, spec)
        records = check_rows(embedder, spec, records, on_error, log)  # the rows the model refuses (empty, over-long)
        texts = records.texts
        pipeline.check_auto_alpha_texts(spec, texts)  # again, without the rows left out
        identity = {"model": model_identity(model.source_dir), **identity}
        # What loading decided (the auto dtype, int8 or streamed where memory is short): each changes the vectors.
        identity["computed"] = {"dtype": str(model.dtype).removeprefix("torch."), "int8": bool(model.int8),
                                "streamed": embedder.streamed, "device": str(model.device)}
        if model.int8:  # fbgemm, avx2 or weight-only: each rounds its own way, so they are not mixed in one job
            identity["computed"]["int8_matmuls"] = int8_matmuls(model.int8_kernel)
        job.check({"computed": identity["computed"]})
        if spec.official:
            order, truncated, width = list(range(len(texts))), 0, embedder.dimension(spec.kind)
        else:
            order, truncated = embedder.corpus_order(texts, spec.features)
            width = embedder.dimension("moee-concat", spec.rw_layers)
        lengths = [len(ids) for ids in embedder.token_ids(texts, spec.features)[0]] if texts else []
        check_batch_memory(embedder, [lengths[i] for i in order] if not spec.official else lengths, batch_size, memory_limit)
        dim = embedder.dimension(spec.kind, None if spec.official else spec.rw_layers)
        if not to_stdout:
            check_disk(job.output.parent, disk_needed(len(order), width, len(texts), dim, fmt, sum(len(t.encode()) for t in texts)))
        job.start(identity, len(order), "vectors" if spec.official else "features", width)

        def compute(start: int, end: int, done=lambda batches: None):
            try:
                return compute_rows(start, end, done)
            except NumericalError as exc:  # named by its place in the input, as the input counts it
                message = re.sub(r"the text at index (\d+)", lambda m: f"{records.name}, {records.where[int(m[1])]}", str(exc))
                raise NumericalError(message) from exc

        tokens_run = [0]  # the tokens of the rows this run computes (not those a resume found saved)

        def compute_rows(start: int, end: int, done):
            rows = order[start:end]
            tokens_run[0] += sum(lengths[i] for i in rows)
            chunk = [texts[i] for i in rows]
            if spec.official:  # its vectors depend on the batch: chunks hold whole batches of the input order
                return pipeline.run(embedder, chunk, spec, batch_size=batch_size, show_progress_bar=False).vectors
            if embedder.streamed:  # every call reads all the layers: one call per chunk
                feats = embedder.features(chunk, spec.features, batch_size=batch_size, show_progress_bar=False, row_names=rows)
                return np.concatenate([feats.hs, feats.rw], axis=1)
            parts = []
            # Batch by batch: the very batches of one call (the rows are in its length order), the bar moving for each.
            for at in range(0, len(chunk), batch_size):
                feats = embedder.features(chunk[at:at + batch_size], spec.features, batch_size=batch_size,
                                          show_progress_bar=False, row_names=rows[at:at + batch_size])
                parts.append(np.concatenate([feats.hs, feats.rw], axis=1))
                done(1)
            return np.concatenate(parts)

        began = time.perf_counter()
        chunks = job.run(len(order), batch_size, compute, streamed=embedder.streamed,
                         show_progress=wants_progress(show_progress, len(texts)))
        seconds = time.perf_counter() - began
        stacked = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
        if spec.official:
            vectors = np.zeros((len(texts), width), np.float32)
            vectors[order] = stacked
            report = pipeline.new_report(embedder, len(texts), batch_size=batch_size,
                                         alpha=float(spec.alpha) if get_kind(spec.kind).uses_alpha else None)
            result = pipeline.Result(vectors, report)
        else:
            hidden = embedder.args.hidden_size
            hs = np.zeros((len(texts), hidden), np.float32)
            rw = np.zeros((len(texts), width - hidden), np.float32)
            hs[order], rw[order] = stacked[:, :hidden], stacked[:, hidden:]  # texts with no token stay zero
            try:
                result = pipeline.finish(embedder, pipeline.Features(hs, rw, truncated), spec, batch_size=batch_size)
            except InputError as exc:
                error = InputError(f"{exc}. Every row is computed and saved in {job.parts}, but --resume takes only the same "
                                   f"options: to change them, remove {job.parts} and run again")
                error.recovery_said = True
                raise error from exc
        report = result.report
        report.skipped = records.bad
        computed = job.done_rows - (job.resumed_rows or 0)
        if seconds > 0 and computed:
            report.texts_per_second = computed / seconds
            report.tokens_per_second = tokens_run[0] / seconds
        provenance = make_provenance(embedder, spec, source, report, records, identity, dim)
        from ..io.outputs import write_embeddings

        write_embeddings(output, result.vectors, fmt, texts if fmt in ("jsonl", "parquet") else None,
                         rows=records.rows, ids=records.ids, fields=records.fields, provenance=provenance)
        write_errors(output, records.bad, log)
        if save_config is not None:
            from ..embedding.spec import save_config as write_config

            write_config(spec, save_config, alpha=report.alpha)
        report.provenance = provenance
    except (Stopped, KeyboardInterrupt) as exc:
        exc.detail = job.stopped_detail()
        if scratch is not None:
            scratch.cleanup()
        raise
    except BaseException as exc:
        job.failed(note=not getattr(exc, "recovery_said", False))
        if scratch is not None:
            scratch.cleanup()
        raise
    job.remove()
    if scratch is not None:
        scratch.cleanup()
    return result


def check_standardizer_widths(embedder, spec) -> None:
    """Each standardizer's width against the model's HS or RW width, before any compute."""
    widths = {"hs": embedder.args.hidden_size,
              "rw": embedder.dimension("rw", None if spec.official else spec.rw_layers)}
    for item in spec.standardizers:
        if item.width != widths[item.kind]:
            raise InputError(f"the {item.kind} standardizer is {item.width} wide, this model's {item.kind.upper()} is "
                             f"{widths[item.kind]} wide (with these --rw-layers): fit it on this model's features")


def check_rows(embedder, spec, records, on_error: str, log):
    """The records without the rows the model refuses (empty, over-long, a prompt longer than max_length): the
    first named as the input counts it (on_error "fail"), or all of them left out and listed (on_error "skip")."""
    from ..io.inputs import BadRow

    try:
        if spec.official:
            _check_official(embedder, spec, records.texts)
        else:
            embedder.token_ids(records.texts, spec.features)
        return records
    except InputError:
        pass
    good, bad = [], []
    for i, text in enumerate(records.texts):
        try:
            if spec.official:
                _check_official(embedder, spec, [text])
            else:
                embedder.token_ids([text], spec.features)
            good.append(i)
        except InputError as exc:
            reason = str(exc).replace("(first at index 0, ", "(").replace("the text at index 0", "the text").replace("text at index 0", "the text")
            if on_error == "fail":
                raise InputError(f"{records.name}, {records.where[i]}: {reason}") from None
            bad.append(BadRow(records.where[i], records.rows[i], records.ids[i] if records.ids is not None else None, reason))
    kept = records.keep(good)
    kept.bad = sorted(kept.bad + bad, key=lambda b: b.row)
    return kept


def _check_official(embedder, spec, texts) -> None:
    from ..embedding.embedder import _check_texts

    _check_texts(texts, spec.allow_empty)


def check_batch_memory(embedder, lengths: list[int], batch_size: int, memory_limit) -> None:
    """Refuse, before it runs, a batch whose activations would not fit: the longest batch (the job's first) estimated
    as the layer-streamed mode's plan counts a batch (hidden states, the block's temporaries, the experts' and the
    attention's)."""
    if not lengths:
        return
    from ..loading.memory import format_bytes, memory_available

    args = embedder.args
    element = 4  # the temporaries are float32 where it matters (softmax, norms); an upper bound for bf16

    def need(batch: int) -> int:
        tokens_per_text = max(lengths[:batch]) if lengths else 1
        tokens = batch * tokens_per_text
        hidden = tokens * args.hidden_size * element
        experts = tokens * args.top_k * 3 * args.expert_size * element
        attention = 2 * batch * args.num_heads * tokens_per_text * tokens_per_text * element
        routing = tokens * args.num_experts * len(args.moe_layers) * element * 2
        return 12 * hidden + experts + attention + routing

    available, where = memory_available(memory_limit, getattr(embedder.model, "device", None))
    estimate = need(min(batch_size, len(lengths)))
    if estimate > available // 2:
        fits = batch_size
        while fits > 1 and need(min(fits, len(lengths))) > available // 2:
            fits //= 2
        raise InputError(
            f"--batch-size {batch_size}: the longest batch's activations would take about {format_bytes(estimate)}, more than half "
            f"of the {format_bytes(available, up=False)} available ({where}); use --batch-size {fits} or less"
        )


def make_provenance(embedder, spec, source, report, records, identity, dim: int) -> dict:
    """What made these vectors: the spec written out (alpha as used), the model, how it computed, the input."""
    from .. import __version__
    from ..io.outputs import PROVENANCE_KEY

    model = identity["model"]
    return {
        "format": PROVENANCE_KEY, "moee_ref": __version__,
        "model": {"source": str(source), "name": model["name"], "revision": model["revision"], "family": embedder.args.family},
        "computed": identity["computed"],
        "spec": spec.to_json(alpha=report.alpha, standardizers="digest"),
        "input": {"name": records.name, "format": records.format, "rows": len(records.texts) + len(records.bad),
                  "embedded": len(records.texts), "skipped": len(records.bad), "texts_sha256": identity["input"]["sha256"]},
        "dim": dim,
    }


def write_errors(output, bad, log) -> None:
    """The rows left out (--on-error skip): OUTPUT.errors.jsonl, one record a row, and a count on stderr."""
    if not bad:
        return
    lines = "".join(json.dumps(b.to_json()) + "\n" for b in bad)
    if str(output) == "-":
        log(f"skipped {len(bad)} bad row(s):")
        for line in lines.splitlines():
            log(line)
        return
    from ..io.outputs import atomic_path, errors_path

    path = errors_path(output)
    with atomic_path(path) as tmp:
        tmp.write_text(lines, encoding="utf-8")
    log(f"skipped {len(bad)} bad row(s) ({', '.join(b.where for b in bad[:3])}{', ...' if len(bad) > 3 else ''}): see {path}")


