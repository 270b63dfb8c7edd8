"""EmbeddingModel: what the embedding floor asks of a loaded model.

The resident MoEDecoder (loading/checkpoint.py `load_model`) and the layer-streamed StreamedModel
(loading/streamed.py) both are one; MoEEmbedder and the pipeline use these members and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

import torch

from ..decoder import DecoderOutput, ModelArgs


@runtime_checkable
class EmbeddingModel(Protocol):
    args: ModelArgs
    source_dir: Path  # where config.json, the tokenizer and the shards were found
    int8: bool  # attention and expert matrices held as int8 (kernels/int8.py)
    int8_kernel: str | None  # with int8: which matmuls run (kernels/int8.py `integer_path`)
    prepared: str | None  # with int8: whether the prepared cache was read, built or not used (loading/prepared.py)
    dtype_reason: str | None  # why this compute dtype was chosen (kernels/precision.py)
    layer_states_available: bool  # False where every block's output is not kept (the streamed mode)

    @property
    def dtype(self) -> torch.dtype: ...  # the compute dtype

    @property
    def device(self) -> torch.device: ...

    def run(self, batches, *, position_ids=None, show_progress_bar: bool = False, prefix_ids=None, continues=None,
            return_layer_states: bool = False) -> Iterable[DecoderOutput]:
        """Decoder outputs for every (input_ids, attention_mask, keep_positions) batch, in order."""
