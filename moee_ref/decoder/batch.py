"""What a padded batch means for every block: positions, masks, real rows; and a shared prefix.

Positions count real tokens only, so a padded text gets exactly the result it
gets alone. A SharedPrefix holds the keys and values of tokens every row
starts with (a prompt's fixed opening), computed once. The input checks live
here too, so every way of running the decoder checks its input the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .args import ModelArgs

_NOT_IDS = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool)


@dataclass
class SharedPrefix:
    """Keys and values, per layer, of tokens that every sequence of a batch starts with.

    Under causal attention nothing a token computes depends on what follows
    it, so a prompt's common opening (PromptEOL's 'This sentence : "') can be
    run once and its keys and values put before each sequence's own: the
    continuation gets the result it gets with the prefix in place.
    """

    ids: tuple[int, ...]
    keys: list[torch.Tensor]  # per layer [1, kv_heads, S, head_dim], rotated as at positions 0..S-1
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return len(self.ids)

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer], self.values[layer]


@dataclass
class BatchLayout:
    """What a padded batch's positions and padding mean for every block."""

    positions: torch.Tensor  # [B, T] rotary positions: real tokens counted from 0, or from after a shared prefix
    full_mask: torch.Tensor | None  # for blocks that run every position (None: plain causal attention)
    last_mask: torch.Tensor | None  # for the last block when it runs the kept positions only
    real_rows: torch.Tensor | None  # [B * T] bool, the rows the MLP runs on (None: no padding)
    windowed: dict = field(default_factory=dict)  # sliding window -> (full_mask, last_mask) for the layers that slide

    @classmethod
    def of(cls, attention_mask, keep_positions=None, prefix_length: int = 0, position_ids=None, windows=()) -> "BatchLayout":
        if position_ids is None:
            position_ids = prefix_length + (attention_mask.cumsum(-1) - 1).clamp(min=0)

        def masks(window):
            full = attention_mask_4d(attention_mask, prefix_length=prefix_length, window=window)
            last = full if keep_positions is None else attention_mask_4d(attention_mask, keep_positions, prefix_length, window)
            return full, last

        full_mask, last_mask = masks(None)
        # A window no sequence outgrows masks nothing more: those layers share the full masks.
        reach = prefix_length + attention_mask.shape[1]
        windowed = {w: masks(w) if reach > w else (full_mask, last_mask) for w in windows if w is not None}
        real_rows = None if bool(attention_mask.all()) else attention_mask.reshape(-1).bool()
        return cls(position_ids, full_mask, last_mask, real_rows, windowed)

    def masks(self, window: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(full_mask, last_mask) for a block whose attention slides over `window` positions (None: it does not)."""
        return (self.full_mask, self.last_mask) if window is None else self.windowed[window]


def attention_mask_4d(
    attention_mask: torch.Tensor, query_positions: torch.Tensor | None = None, prefix_length: int = 0,
    window: int | None = None,
) -> torch.Tensor | None:
    """Boolean [B, 1, Q, S + T] mask: causal, and no real query ever sees a padding key.

    Every position may also see itself, so that no row is fully masked: a
    padding query then attends to itself (its result is never read) and
    softmax never divides by zero, so no NaN can appear in any dtype.
    prefix_length S: keys of a shared prefix come first, seen by every query.
    window W (sliding-window attention): a query also sees no key W or more
    real tokens back. Distances count real tokens, so padding between a prefix
    and a row's text does not shorten the window.
    Returns None where there is no padding, no window and every position is
    a query, for the plain causal kernel.
    """
    if query_positions is None and not prefix_length and window is None and bool(attention_mask.all()):
        return None
    if prefix_length:  # the prefix is S real tokens before each row; queries are the row's own positions
        batch = attention_mask.shape[0]
        own = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand(batch, -1)
        queries = prefix_length + (own if query_positions is None else query_positions)
        prefix_mask = attention_mask.new_ones(batch, prefix_length)
        return attention_mask_4d(torch.cat((prefix_mask, attention_mask), dim=1), queries, window=window)
    batch, length = attention_mask.shape
    keys = torch.arange(length, device=attention_mask.device)
    queries = keys.expand(batch, -1) if query_positions is None else query_positions
    causal = keys[None, None, :] <= queries[:, :, None]  # [B, Q, T]
    allowed = causal & attention_mask.bool()[:, None, :]
    if window is not None:
        rank = attention_mask.cumsum(-1)  # real tokens up to and including each index
        allowed &= rank.gather(1, queries)[:, :, None] - rank[:, None, :] < window
    allowed |= keys[None, None, :] == queries[:, :, None]
    return allowed[:, None]


# ---------------------------------------------------------------------------
# Input checks, one set for every way of running the decoder.


def check_inputs(args: ModelArgs, input_ids, attention_mask, prefix_length: int = 0):
    """(input_ids, attention_mask) as long tensors, or an InputError naming what is wrong."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise InputError("input_ids must be a 2-D tensor [batch, length]; wrap a single sequence as [ids]")
    if input_ids.dtype in _NOT_IDS:
        raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise InputError(f"empty batch: input_ids has shape {tuple(input_ids.shape)}; pass at least one token")
    if length > args.max_position_embeddings:
        raise InputError(
            f"sequence length {length} exceeds max_position_embeddings={args.max_position_embeddings}; "
            "truncate the input (tokenizer max_length)"
        )
    if prefix_length + length > args.max_position_embeddings:
        raise InputError(
            f"prefix ({prefix_length} tokens) and input ({length}) exceed max_position_embeddings="
            f"{args.max_position_embeddings}; truncate the input"
        )
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= args.vocab_size:
        bad = low if low < 0 else high
        raise InputError(f"token id {bad} is outside the vocabulary [0, {args.vocab_size}); check the tokenizer")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise InputError(f"attention_mask must be a tensor [batch, length] (or None), got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape {tuple(input_ids.shape)}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise InputError("attention_mask must contain only 0 (padding) and 1 (real token)")
    if not bool(attention_mask.any(dim=-1).all()):
        raise InputError("a row of attention_mask has no real token; drop empty sequences from the batch")
    return input_ids.long(), attention_mask.long()


def check_keep(keep, batch: int, length: int) -> torch.Tensor:
    if not isinstance(keep, torch.Tensor) or keep.dim() != 2 or keep.shape[0] != batch or keep.shape[1] == 0:
        raise InputError(f"keep_positions must be a tensor [batch={batch}, P] of positions with P >= 1")
    if keep.dtype in _NOT_IDS:
        raise InputError(f"keep_positions must hold integer positions, got dtype {keep.dtype}")
    if int(keep.min()) < 0 or int(keep.max()) >= length:
        raise InputError(f"keep_positions must lie in [0, {length}), the sequence length")
    return keep.long()


def check_prefix(prefix, num_layers: int) -> int:
    if not isinstance(prefix, SharedPrefix) or len(prefix.keys) != num_layers:
        raise InputError(f"prefix must be a SharedPrefix of this model ({num_layers} layers); build it with encode_prefix")
    return prefix.length


def check_batches(args: ModelArgs, batches, prefix_ids, continues, position_ids=None):
    """The arguments of a model's `run`, checked: [(input_ids, attention_mask, keep_positions)], one
    `continues` flag per batch (the rows hold only what follows `prefix_ids`), position ids per batch or None."""
    continues = list(continues) if continues is not None else [False] * len(batches)
    if len(continues) != len(batches) or (any(continues) and not prefix_ids):
        raise InputError("continues needs one flag per batch, and prefix_ids for the batches it flags")
    if position_ids is not None and len(position_ids) != len(batches):
        raise InputError(f"position_ids needs one tensor per batch ({len(batches)}), got {len(position_ids)}")
    checked = []
    for (ids, mask, keep), shifted in zip(batches, continues):
        ids, mask = check_inputs(args, ids, mask, len(prefix_ids) if shifted else 0)
        checked.append((ids, mask, None if keep is None else check_keep(keep, *ids.shape)))
    return checked, continues
