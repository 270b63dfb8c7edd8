import sys
from pathlib import Path

# The tests import their shared helpers (hf_reference.py) as plain modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest


@pytest.fixture(autouse=True, scope="session")
def _prepared_cache_in_tmp(tmp_path_factory):
    """int8 loads keep prepared weights in a cache (loading/prepared.py): in the tests, a temporary folder, never the
    user's ~/.cache."""
    import os

    previous = os.environ.get("MOEE_CACHE_DIR")
    os.environ["MOEE_CACHE_DIR"] = str(tmp_path_factory.mktemp("prepared-cache"))
    yield
    if previous is None:
        os.environ.pop("MOEE_CACHE_DIR", None)
    else:
        os.environ["MOEE_CACHE_DIR"] = previous
