import os
import shutil
import sys
import tempfile
from pathlib import Path

# The tests import their shared helpers (hf_reference.py) as plain modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))

_PREVIOUS_CACHE = os.environ.get("MOEE_CACHE_DIR")
_TEST_CACHE: str | None = None


def pytest_configure(config):
    """What moee-ref builds once per machine (prepared int8 weights, the AVX2 int8 kernel's library; cache_dir.py)
    goes, in the tests, to a temporary folder, never the user's ~/.cache: set before collection, since some test
    modules build the kernel when they are imported, and removed at the end."""
    global _TEST_CACHE
    _TEST_CACHE = tempfile.mkdtemp(prefix="moee-test-cache-")
    os.environ["MOEE_CACHE_DIR"] = _TEST_CACHE


def pytest_unconfigure(config):
    if _PREVIOUS_CACHE is None:
        os.environ.pop("MOEE_CACHE_DIR", None)
    else:
        os.environ["MOEE_CACHE_DIR"] = _PREVIOUS_CACHE
    if _TEST_CACHE is not None:
        shutil.rmtree(_TEST_CACHE, ignore_errors=True)
