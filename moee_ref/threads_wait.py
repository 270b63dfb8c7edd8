"""How long torch's OpenMP threads spin before they sleep, set before torch loads its OpenMP runtime.

Between two parallel regions (every matmul, norm and expert at batch 1 is one) an idle OpenMP thread of
libgomp, which torch's CPU builds use, spins for GOMP_SPINCOUNT iterations (300000 by default, about a
millisecond) before it sleeps. On a quiet machine that saves a wake-up per region. When another process
holds a core, the spinning thread burns the time slice the working thread on that core needed, and a
region waits for its slowest thread: at 2 threads with one busy process beside them, batch 1 ran 10x and
batch 32 3x slower than quiet, where the CPU taken away accounts for 2x at most (bench/bench_contention.py).
A spin of 3000 iterations brings that to about 1.9x at both (proportional: one of the two cores was
taken) for about a tenth more time at batch 1 when quiet; 10000 kept the quiet speed but left batch 1
at 2.5x to 2.7x, and OMP_WAIT_POLICY=PASSIVE (threads sleep at once) costs about a quarter quiet.

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
