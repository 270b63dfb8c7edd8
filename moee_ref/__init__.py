"""moee-ref: reference MoE decoders whose routers give text embeddings for free (MoEE)."""

from .checkpoint import load_model
from .config import ModelArgs, read_config
from .embed import MoEEmbedder
from .standardize import Standardizer
from .tokenizer import Tokenizer
from .errors import CheckpointError, ConfigError, InputError, ModelNotFoundError, MoEERefError, UnsafeCheckpointError
from .model import DecoderOutput, MoEDecoder, Routing

__all__ = [
    "load_model",
    "MoEEmbedder",
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
]
