"""oneDNN for float32 on the CPU: `linear`, weights packed for it, and the modules that use it.

torch sends float32 matmuls to MKL, which on AMD CPUs runs its AVX2 code
whatever the CPU has. oneDNN, which torch also ships (for its own compiled
CPU graphs), uses the widest vector unit present (AVX-512 where there is
one) and keeps its speed with the few rows an expert gets. So float32 on the
CPU goes through oneDNN; everything else (float64, bf16, gradients) through
F.linear. The results differ from F.linear only in float32 rounding.

A weight can also be packed once into oneDNN's own blocked layout
(`pack_weight`): the same bytes, but no re-blocking on every call, which
matters most at batch 1, where each expert matrix is streamed from memory
for a handful of rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..decoder.layers import Linear
from ..decoder.moe import Router

_MKLDNN = getattr(torch.ops, "mkldnn", None) if torch.backends.mkldnn.is_available() else None
_ONEDNN_LINEAR = getattr(_MKLDNN, "_linear_pointwise", None)
_ONEDNN_PACK = getattr(_MKLDNN, "_reorder_linear_weight", None)

# oneDNN builds a kernel for every input shape it meets and keeps it (about half a MiB each, up to a thousand
# of them). Rows therefore go in tiles whose sizes come from a small set: whole tiles of ROW_TILE * 2^i rows,
# then the rest padded to a multiple of ROW_STEP (at most ROW_STEP - 1 wasted rows). Fewer than EXACT_ROWS
# rows run as they are: at batch 1 an expert gets a handful of rows, and there padding to a tile costs more
# than a kernel of its own (bench/bench_expert_read.py --rows). A whole run then meets a few dozen shapes
# per weight matrix.
ROW_TILE, ROW_STEP, EXACT_ROWS = 128, 8, 16


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN serves float32 on the CPU, for tensors that need no gradient (its op has no autograd)."""
    return (
        _ONEDNN_LINEAR is not None
        and x.dtype == weight.dtype == torch.float32
        and x.device.type == weight.device.type == "cpu"
        and not (x.requires_grad or weight.requires_grad)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, as F.linear; weight [out, in] as a tensor or packed by `pack_weight`."""
    if weight.is_mkldnn or (onednn_applies(x, weight) and (bias is None or not bias.requires_grad)):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    def run(rows: torch.Tensor) -> torch.Tensor:
        return _ONEDNN_LINEAR(rows, weight, bias, "none", [], "")  # no fused activation

    rows = x.reshape(-1, x.shape[-1])
    pieces = [run(rows[start:end]) for start, end in row_tiles(len(rows))]
    rest = len(rows) % ROW_TILE
    if rest >= EXACT_ROWS and rest % ROW_STEP:
        pieces.append(run(F.pad(rows[len(rows) - rest :], (0, 0, 0, ROW_STEP - rest % ROW_STEP)))[:rest])
    elif rest:
        pieces.append(run(rows[len(rows) - rest :]))
    if not pieces:  # no rows at all
        return x.new_empty(*x.shape[:-1], weight.shape[0])
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def row_tiles(num_rows: int) -> list[tuple[int, int]]:
    """(start, end) of the whole tiles of num_rows: ROW_TILE * 2^i rows each, largest first."""
    tiles, start = [], 0
    whole = num_rows // ROW_TILE
    for bit in reversed(range(whole.bit_length())):
        if whole >> bit & 1:
            tiles.append((start, start + (ROW_TILE << bit)))
            start += ROW_TILE << bit
    return tiles


def packing_available() -> bool:
    return _ONEDNN_PACK is not None and _ONEDNN_LINEAR is not None


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A float32 [out, in] weight in oneDNN's blocked layout, for `linear` (same values, same size)."""
    return _ONEDNN_PACK(weight.contiguous())


def onednn_serves(dtype: torch.dtype) -> bool:
    """Whether float32 matmuls of this dtype go to oneDNN in this torch build (what `linear` decides per call)."""
    return _ONEDNN_LINEAR is not None and dtype == torch.float32


class OneDNNLinear(Linear):
    """Linear through `linear`: oneDNN for float32, the weight plain or packed by `pack_weight`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class OneDNNRouter(Router):
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
