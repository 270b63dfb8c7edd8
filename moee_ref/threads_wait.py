"""How long torch's OpenMP threads spin before they sleep, set before torch loads its OpenMP runtime.

Between two parallel regions (every matmul, norm and expert at batch 1 is one) an idle OpenMP thread of
libgomp, which torch's CPU builds use, spins for GOMP_SPINCOUNT iterations (300000 by default, about a
millisecond) before it sleeps. On a quiet machine that saves a wake-up per region. When another process
holds a core, the spinning thread burns the time slice the working thread on that core needed, and a
region waits for its slowest thread, so a long spin makes a shared machine far slower than the core taken
away explains. A short spin keeps most of the quiet speed and makes contention cost what it takes; the
measurements behind the value are bench/bench_contention.py's, in bench/README.md.

libgomp reads these variables once, when it is loaded (with torch): this only takes effect where
moee_ref is imported before torch (the `moee` command always is), and never overrides a value the user
set (GOMP_SPINCOUNT or OMP_WAIT_POLICY, or KMP_BLOCKTIME for Intel's runtime).
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "3000"
USER_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")


def spin_briefly() -> str:
    """Set GOMP_SPINCOUNT for torch's OpenMP threads where it can still take effect; what was done, in words."""
    given = [name for name in USER_SETTINGS if name in os.environ]
    if given:
        return f"{', '.join(f'{n}={os.environ[n]}' for n in given)} as set in the environment"
    if "torch" in sys.modules:
        return "OpenMP's default spin (torch was imported before moee_ref; set GOMP_SPINCOUNT before starting Python)"
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return f"GOMP_SPINCOUNT={SPIN_COUNT}, set by moee-ref"


OPENMP_WAIT = spin_briefly()
