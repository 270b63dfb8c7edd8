"""moee-ref: reference MoE decoders whose routers give text embeddings for free (MoEE).

The public names are imported on first use, so that `moee --version`, `moee --help` and a Ctrl-C while the
command starts never wait for torch."""

# First, before anything imports torch: how its OpenMP threads wait (threads_wait.py).
from .threads_wait import OPENMP_WAIT  # noqa: F401  (isort: skip)

__version__ = "0.1.0"  # the same as pyproject.toml's (a test checks)

_PUBLIC = {
    "load_model": ".loading.checkpoint",
    "MoEEmbedder": ".embedding.embedder",
    "EmbedSpec": ".embedding.spec",
    "encode_official": ".embedding.official",
    "Standardizer": ".embedding.standardize",
    "Tokenizer": ".loading.tokenizer",
    "read_config": ".families",
    "ModelArgs": ".decoder",
    "MoEDecoder": ".decoder",
    "DecoderOutput": ".decoder",
    "Routing": ".decoder",
    **{name: ".errors" for name in ("MoEERefError", "ConfigError", "CheckpointError", "UnsafeCheckpointError",
                                     "ModelNotFoundError", "InputError", "UnknownOptionError")},
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'moee_ref' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
