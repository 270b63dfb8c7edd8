"""`moee serve`: an OpenAI-compatible embeddings server that also returns router weights.

A thin front end on the embedding API (MoEEmbedder.encode): it parses and checks requests (schemas.py),
queues them and gathers them into batches on one worker thread (batcher.py), and answers over HTTP
(app.py, on Starlette and uvicorn: server.py). It computes no vector itself.
Needs the `serve` extra: pip install 'moee-ref[serve]'.
"""

from __future__ import annotations

import importlib.util

from ..errors import MissingExtraError

SERVE_MODULES = ("starlette", "uvicorn", "prometheus_client")


def require_serve() -> None:
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"moee serve needs {', '.join(missing)}: pip install 'moee-ref[serve]'")
