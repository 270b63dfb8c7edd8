"""moee-ref: reference MoE decoders whose routers give text embeddings for free (MoEE)."""

# First, before anything imports torch: how its OpenMP threads wait (threads_wait.py).
from .threads_wait import OPENMP_WAIT  # noqa: F401  (isort: skip)
from .loading.checkpoint import load_model
from .decoder import DecoderOutput, ModelArgs, MoEDecoder, Routing
from .families import read_config
from .embedding.embedder import MoEEmbedder
from .embedding.standardize import Standardizer
from .embedding.official import encode_official
from .loading.tokenizer import Tokenizer
from .errors import CheckpointError, ConfigError, InputError, ModelNotFoundError, MoEERefError, UnknownOptionError, UnsafeCheckpointError

__all__ = [
    "load_model",
    "MoEEmbedder",
    "encode_official",
    "Standardizer",
    "Tokenizer",
    "read_config",
    "ModelArgs",
    "MoEDecoder",
    "DecoderOutput",
    "Routing",
    "MoEERefError",
    "ConfigError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "ModelNotFoundError",
    "InputError",
    "UnknownOptionError",
]
