"""Per-feature standardisation of embeddings.

The authors' code standardises RW and MoEE features within each batch, so an
embedding depends on which other sentences share its batch. The principled
alternative here is ``Standardizer``: statistics are fitted once on a corpus,
saved, loaded and applied to any text, so one text always gets one embedding.
``standardize_per_batch`` reproduces the authors' behaviour for an
"official-code" mode only.

Both use the sample standard deviation (ddof=1): the authors call
``torch.Tensor.std``, whose default applies Bessel's correction. Fitting a
``Standardizer`` on a batch and transforming that batch therefore matches the
per-batch version (apart from its NaN -> 0 step).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np
from numpy.lib.npyio import NpzFile  # the type np.load returns for an .npz archive

from ..errors import InputError
from ..io.outputs import atomic_path

FORMAT_VERSION = 1
DEFAULT_EPS = 1e-8
_SAVED_KEYS = ("format_version", "kind", "eps", "mean", "std")


# eq=False: the generated __eq__ would compare arrays element-wise and fail.
@dataclass(eq=False)
class Standardizer:
    """Fitted per-feature mean and std; ``transform`` maps x to (x - mean) / (std + eps).

    ``kind`` labels what the statistics were fitted for (e.g. "rw", or a longer label such as "rw:my-model"), so
    a mismatch can be reported in words. A feature constant on the fit corpus
    has std 0 and is divided by ``eps`` alone, as in the authors' formula.
    """

    mean: np.ndarray
    std: np.ndarray
    kind: str = ""
    eps: float = DEFAULT_EPS

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.std = np.asarray(self.std, dtype=np.float64)
        if self.mean.ndim != 1 or self.mean.shape != self.std.shape:
            raise InputError(
                f"mean and std must be 1-D arrays of one width, got shapes {self.mean.shape} and {self.std.shape}"
            )
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.std))):
            raise InputError("mean and std must be finite; refit the standardizer on finite data")
        if np.any(self.std < 0):
            raise InputError("std must be >= 0; these are not standard deviations")
        if not isinstance(self.kind, str):
            raise InputError(f"kind must be a string, got {type(self.kind).__name__}")
        self.eps = float(self.eps)
        if not (np.isfinite(self.eps) and self.eps > 0):
            raise InputError(f"eps must be a positive finite number, got {self.eps}")

    @property
    def width(self) -> int:
        return int(self.mean.size)

    @classmethod
    def fit(cls, X, kind: str = "", eps: float = DEFAULT_EPS) -> "Standardizer":
        """Fit per-feature mean and sample std (ddof=1) on ``X`` of shape [N, D], N >= 2."""
        data = _as_finite_matrix(X, "X")
        if data.shape[0] < 2:
            raise InputError(
                f"fitting needs at least 2 rows to estimate a spread, got {data.shape[0]}; fit on a larger corpus"
            )
        return cls(mean=data.mean(axis=0), std=data.std(axis=0, ddof=1), kind=kind, eps=eps)

    def transform(self, X) -> np.ndarray:
        """Standardise rows of ``X`` ([N, D] or a single [D] vector); returns float32."""
        data = np.asarray(X, dtype=np.float64)
        if data.ndim not in (1, 2):
            raise InputError(f"transform expects [N, D] or [D], got shape {data.shape}")
        if data.shape[-1] != self.width:
            fitted_for = f" fitted for {self.kind!r}" if self.kind else ""
            raise InputError(
                f"input has width {data.shape[-1]} but the standardizer{fitted_for} has width "
                f"{self.width}; use statistics fitted on the same model and embedding type"
            )
        if not np.all(np.isfinite(data)):
            raise InputError("transform input contains NaN or infinite values; fix the embeddings first")
        return ((data - self.mean) / (self.std + self.eps)).astype(np.float32)

    def save(self, path) -> None:
        """Write the statistics to ``path`` as an .npz file (plain arrays, no pickle).

        The file is written at exactly ``path``; no ".npz" suffix is added.
        """
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                np.savez(
                    handle,
                    format_version=np.int64(FORMAT_VERSION),
                    kind=np.str_(self.kind),
                    eps=np.float64(self.eps),
                    mean=self.mean,
                    std=self.std,
                )
        except OSError as error:
            raise InputError(f"cannot write standardizer statistics to {os.fspath(path)!r}: {error}") from error

    @classmethod
    def load(cls, path) -> "Standardizer":
        """Read statistics written by ``save``; anything else raises ``InputError``."""
        where = repr(os.fspath(path))
        if not os.path.isfile(path):
            raise InputError(f"no standardizer file at {where}; fit one and save() it first")
        fields = _read_npz_fields(path, where)
        version = _check_format_version(fields["format_version"], where)
        try:
            return cls(
                mean=fields["mean"],
                std=fields["std"],
                kind=str(fields["kind"][()]),
                eps=float(fields["eps"]),
            )
        except (InputError, TypeError, ValueError) as error:
            raise InputError(f"{where} (format {version}) holds invalid statistics: {error}") from error


def _read_npz_fields(path, where: str) -> dict[str, np.ndarray]:
    """Load every expected array of an .npz, refusing pickled content."""
    # Corrupt or foreign files fail in many ways; each becomes one clear InputError.
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError)
    try:
        # Opening the file ourselves guarantees it is closed even when numpy
        # fails half-way through a corrupt archive.
        with open(path, "rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, NpzFile):
                raise InputError(f"{where} holds a single .npy array, not a standardizer .npz file")
            with loaded as archive:
                _require_keys(archive.files, where)
                return {key: archive[key] for key in _SAVED_KEYS}
    except InputError:
        raise
    except unreadable as error:
        raise InputError(f"{where} is not a readable standardizer .npz file ({error}); save() it again") from error


def _require_keys(present: list[str], where: str) -> None:
    missing = [key for key in _SAVED_KEYS if key not in present]
    if missing:
        raise InputError(
            f"{where} is not a standardizer file: missing {', '.join(missing)} "
            f"(expected keys: {', '.join(_SAVED_KEYS)})"
        )


def _check_format_version(stored: np.ndarray, where: str) -> int:
    if stored.shape != () or not np.issubdtype(stored.dtype, np.integer):
        raise InputError(f"{where} has a malformed format_version; save() the standardizer again")
    version = int(stored)
    if version != FORMAT_VERSION:
        raise InputError(
            f"{where} uses standardizer format version {version}, but this moee-ref reads version "
            f"{FORMAT_VERSION}; refit and save with this version"
        )
    return version


def _as_finite_matrix(X, name: str) -> np.ndarray:
    data = np.asarray(X, dtype=np.float64)
    if data.ndim != 2:
        raise InputError(f"{name} must be a 2-D array [N, D], got shape {data.shape}")
    if data.shape[1] == 0:
        raise InputError(f"{name} has no features (shape {data.shape})")
    if not np.all(np.isfinite(data)):
        raise InputError(f"{name} contains NaN or infinite values; remove or fix those rows first")
    return data


def standardize_per_batch(X, eps: float = DEFAULT_EPS) -> np.ndarray:
    """The authors' per-batch standardisation, for the official-code mode only.

    Each feature becomes (x - batch mean) / (batch sample std + eps), with
    ddof=1 as ``torch.Tensor.std`` computes, then NaN becomes 0. A batch of
    one row has an undefined sample std, so -- as in the authors' code -- it
    comes out all zeros. Computed in float64, returned as float32. Infinite
    values are not touched (the authors replace only NaN).
    """
    data = np.asarray(X, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] == 0:
        raise InputError(f"standardize_per_batch expects a non-empty [N, D] batch, got shape {data.shape}")
    rows = data.shape[0]
    # Silence numpy's warnings: the undefined cases are mapped to 0 below, by design.
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = data.mean(axis=0)
        centred = data - mean
        if rows > 1:
            sample_std = np.sqrt(np.sum(centred * centred, axis=0) / (rows - 1))
        else:
            sample_std = np.full_like(mean, np.nan)  # torch.std of one row is NaN too
        standardised = centred / (sample_std + eps)
    return np.where(np.isnan(standardised), 0.0, standardised).astype(np.float32)
