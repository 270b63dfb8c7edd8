"""What the pipeline returns: the vectors and a report of what ran (pipeline.py, official.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .alpha import AlphaChoice


@dataclass
class Features:
    """Per text, the two raw ingredients of every kind."""

    hs: np.ndarray  # [N, D] float32
    rw: np.ndarray  # [N, L_used * E] float32
    num_truncated: int = 0


@dataclass
class EncodeReport:
    """What one call did, for callers and the command line."""

    num_texts: int = 0
    num_truncated: int = 0
    alpha: float | None = None
    alpha_choice: AlphaChoice | None = None
    dtype: str | None = None  # the compute dtype that ran, and why it was chosen (kernels/precision.py)
    dtype_reason: str | None = None
    int8_kernel: str | None = None  # with int8: which matmuls ran (kernels/int8.py `integer_path`)
    prepared: str | None = None  # with int8: whether the prepared cache was read, built or not used (loading/prepared.py)
    batch_size: int | None = None  # the official mode's: its per-batch standardisation depends on it
    notes: list[str] = field(default_factory=list)
    # Corpus jobs (jobs/corpus.py): the rows left out (--on-error skip), the rate of the rows computed in this
    # run, and the provenance record written with the output.
    skipped: list = field(default_factory=list)
    texts_per_second: float | None = None
    tokens_per_second: float | None = None
    provenance: dict | None = None


@dataclass(frozen=True)
class Result:
    vectors: np.ndarray  # float32 [N, dim] in input order
    report: EncodeReport


def new_report(embedder, num_texts: int, num_truncated: int = 0, **values) -> EncodeReport:
    model = embedder.model
    return EncodeReport(num_texts=num_texts, num_truncated=num_truncated, dtype=str(model.dtype).removeprefix("torch."),
                        dtype_reason=model.dtype_reason, int8_kernel=model.int8_kernel, prepared=model.prepared, **values)
