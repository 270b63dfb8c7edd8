"""The math: model arguments, layers, the MoE layer, batch layout and the decoder's one layer loop."""

from .args import ModelArgs
from .batch import SharedPrefix
from .model import Block, DecoderOutput, MoEDecoder, Routing

__all__ = ["ModelArgs", "SharedPrefix", "Block", "DecoderOutput", "MoEDecoder", "Routing"]
