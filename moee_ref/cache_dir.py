"""Where moee-ref keeps what it builds once per machine: prepared int8 layers (loading/prepared.py) and the AVX2
int8 kernel's library (kernels/int8_avx2.py). At the package's root because both floors use it."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MOEE_CACHE_DIR"


def cache_root(option: str | os.PathLike | None = None) -> Path:
    """The folder caches go under: the option, else $MOEE_CACHE_DIR, else $XDG_CACHE_HOME/moee-ref, else ~/.cache/moee-ref."""
    if option is not None:
        return Path(option).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "moee-ref"
