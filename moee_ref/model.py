"""The decoder: embeddings, N pre-norm blocks, final norm; routing as an output.

One class serves all three families; what differs between them is decided by
ModelArgs (see config.py and families/). The forward pass returns a
DecoderOutput whose `routing` holds every MoE layer's router logits,
probabilities and top-k choices: they are results of the computation, not
something observed from the side with hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelArgs
from .errors import InputError
from .layers import MoE, Attention, LayerRouting, RMSNorm, SwiGLU, gather_positions, rotary_cos_sin


@dataclass
class Routing:
    """Router outputs of all MoE layers, stacked: index 1 runs over `moe_layers`."""

    logits: torch.Tensor  # [B, L_moe, T, E] float32
    probs: torch.Tensor  # [B, L_moe, T, E] float32, softmax over all experts
    topk_ids: torch.Tensor  # [B, L_moe, T, k]
    topk_weights: torch.Tensor  # [B, L_moe, T, k] float32, the weights actually used to mix
    moe_layers: tuple[int, ...]  # decoder layer index of each entry

    @classmethod
    def stack(cls, per_layer: list[LayerRouting], moe_layers: tuple[int, ...], batch: int, length: int) -> "Routing":
        def gather(field: str) -> torch.Tensor:
            tensors = [getattr(r, field).reshape(batch, length, -1) for r in per_layer]
            return torch.stack(tensors, dim=1)

        return cls(gather("logits"), gather("probs"), gather("topk_ids"), gather("topk_weights"), moe_layers)


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


@dataclass
class BatchLayout:
    """What a padded batch's positions and padding mean for every block."""

    positions: torch.Tensor  # [B, T] rotary positions: real tokens counted from 0, or from after a shared prefix
    full_mask: torch.Tensor | None  # for blocks that run every position (None: plain causal attention)
    last_mask: torch.Tensor | None  # for the last block when it runs the kept positions only
    real_rows: torch.Tensor | None  # [B * T] bool, the rows the MLP runs on (None: no padding)

    @classmethod
    def of(cls, attention_mask, keep_positions=None, prefix_length: int = 0, position_ids=None) -> "BatchLayout":
        if position_ids is None:
            position_ids = prefix_length + (attention_mask.cumsum(-1) - 1).clamp(min=0)
        full_mask = attention_mask_4d(attention_mask, prefix_length=prefix_length)
        last_mask = full_mask if keep_positions is None else attention_mask_4d(attention_mask, keep_positions, prefix_length)
        real_rows = None if bool(attention_mask.all()) else attention_mask.reshape(-1).bool()
        return cls(position_ids, full_mask, last_mask, real_rows)


@dataclass
class DecoderOutput:
    hidden_states: torch.Tensor  # [B, T, D] after the final norm
    routing: Routing
    logits: torch.Tensor | None = None  # [B, T, V], only with return_logits=True
    layer_hidden_states: tuple[torch.Tensor, ...] | None = None  # output of each block, with return_layer_states=True

    # The routing contract, spelled as flat attributes too.
    @property
    def router_logits(self) -> torch.Tensor:
        return self.routing.logits

    @property
    def router_probs(self) -> torch.Tensor:
        return self.routing.probs

    @property
    def topk_ids(self) -> torch.Tensor:
        return self.routing.topk_ids

    @property
    def topk_weights(self) -> torch.Tensor:
        return self.routing.topk_weights

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.routing.moe_layers


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x)); the MLP is an MoE or a plain SwiGLU."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.is_moe = layer in args.moe_layers
        self.mlp = MoE(args) if self.is_moe else SwiGLU(args.hidden_size, args.dense_size)

    def forward(self, x, cos, sin, mask, keep=None, real=None, past=None) -> tuple[torch.Tensor, LayerRouting | None]:
        """keep [B, P]: return only these positions (queries and MLP run on them alone).

        real [B * T] bool: the MLP (and the router) run on these token rows only.
        Padding rows get a zero MLP output and zero routing: nothing reads them,
        and on batches of unequal lengths they are a third of the work.
        """
        residual = x if keep is None else gather_positions(x, keep)
        x = residual + self.attn(self.attn_norm(x), cos, sin, mask, keep, past)
        batch, length, dim = x.shape
        flat = self.mlp_norm(x).reshape(-1, dim)
        rows = None if real is None else real.nonzero().squeeze(1)
        tokens = flat if rows is None else flat[rows]
        out, routing = self.mlp(tokens) if self.is_moe else (self.mlp(tokens), None)
        if rows is not None:
            out = torch.zeros_like(flat).index_copy_(0, rows, out)
            routing = routing and routing.placed(rows, len(flat))
        return x + out.reshape(batch, length, dim), routing

    def run_prefix(self, x, cos, sin, feeds_next: bool = True) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """For a shared prefix x [1, S, D]: its output, and the keys and values its continuations attend to.

        feeds_next=False (the last block): only the keys and values; the prefix's output there is never read.
        """
        keys_values = self.attn.keys_values(self.attn_norm(x), cos, sin)
        return (self(x, cos, sin, None)[0] if feeds_next else None), keys_values


class MoEDecoder(nn.Module):
    def __init__(self, args: ModelArgs, with_lm_head: bool = True):
        super().__init__()
        self.args = args
        # No random init: the table is read from the checkpoint, and nn.Embedding's normal_ init on the meta
        # device pulls in a second of torch imports on every load.
        self.embed = nn.Embedding.from_pretrained(torch.empty(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        # Embeddings never need the output matrix (vocab x hidden: 0.4B parameters for DeepSeekMoE).
        separate_head = with_lm_head and not args.tie_word_embeddings
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False) if separate_head else None
        self.with_lm_head = with_lm_head
        self.source_dir = None  # set by the loader: where config, tokenizer and weights were found

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype  # the compute dtype (a packed model keeps its embedding table as stored)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        keep_positions: torch.Tensor | None = None,
        return_logits: bool = False,
        return_layer_states: bool = False,
        prefix: SharedPrefix | None = None,
    ) -> DecoderOutput:
        """Run the decoder on a batch.

        input_ids [B, T]; attention_mask [B, T] with 1 on real tokens (left or
        right padding). Positions count real tokens only, so a padded text
        gets exactly the result it gets alone; pass position_ids to override.
        keep_positions [B, P]: return hidden states, routing and layer states at
        these positions only; the last block then computes just them.
        prefix: a SharedPrefix (from `encode_prefix`) that every row continues:
        input_ids then hold only what follows it, and positions start after it.
        Outputs cover input_ids' positions only.
        """
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask)
        batch, length = input_ids.shape
        shift = 0 if prefix is None else self._check_prefix(prefix, length)
        if keep_positions is not None:
            keep_positions = self._check_keep(keep_positions, batch, length)
        layout = BatchLayout.of(attention_mask, keep_positions, shift, position_ids)
        past = [None] * len(self.layers) if prefix is None else list(zip(prefix.keys, prefix.values))

        x = self.embed(input_ids).to(self.dtype)
        cos, sin = rotary_cos_sin(layout.positions, self.args.head_dim, self.args.rope_theta, x.dtype)
        per_layer_routing, layer_states = [], []
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            if i == last and keep_positions is not None:
                # Only the kept positions of the last block are ever read: run its queries and MLP on them alone.
                x, routing = block(x, cos, sin, layout.last_mask, keep_positions, past=past[i])
            else:
                x, routing = block(x, cos, sin, layout.full_mask, real=layout.real_rows, past=past[i])
                if keep_positions is not None and routing is not None:
                    routing = _gather_routing(routing, keep_positions, length)
            if routing is not None:
                per_layer_routing.append(routing)
            if return_layer_states:
                layer_states.append(x if i == last or keep_positions is None else gather_positions(x, keep_positions))
        hidden = self.norm(x)
        logits = None
        if return_logits:
            if not self.with_lm_head:
                raise InputError("this model was loaded without its LM head (for embeddings); load it with lm_head=True for logits")
            head = self.embed.weight if self.lm_head is None else self.lm_head.weight
            logits = torch.nn.functional.linear(hidden, head.to(hidden.dtype))
        out_length = length if keep_positions is None else keep_positions.shape[1]
        routing = Routing.stack(per_layer_routing, self.args.moe_layers, batch, out_length)
        return DecoderOutput(hidden, routing, logits, tuple(layer_states) if return_layer_states else None)

    def encode_prefix(self, ids: list[int]) -> SharedPrefix:
        """Keys and values of every layer for the token ids `ids`, at positions 0..len(ids)-1."""
        input_ids, _ = self._check_inputs(torch.tensor([list(ids)]), None)
        x = self.embed(input_ids).to(self.dtype)
        cos, sin = rotary_cos_sin(torch.arange(len(ids))[None], self.args.head_dim, self.args.rope_theta, x.dtype)
        keys, values = [], []
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            x, (k, v) = block.run_prefix(x, cos, sin, feeds_next=i < last)
            keys.append(k)
            values.append(v)
        return SharedPrefix(tuple(int(i) for i in ids), keys, values)

    def _check_prefix(self, prefix, length: int) -> int:
        if not isinstance(prefix, SharedPrefix) or len(prefix.keys) != len(self.layers):
            raise InputError(f"prefix must be a SharedPrefix of this model ({len(self.layers)} layers); build it with encode_prefix")
        if prefix.length + length > self.args.max_position_embeddings:
            raise InputError(
                f"prefix ({prefix.length} tokens) and input ({length}) exceed max_position_embeddings="
                f"{self.args.max_position_embeddings}; truncate the input"
            )
        return prefix.length

    def _check_keep(self, keep, batch, length):
        if not isinstance(keep, torch.Tensor) or keep.dim() != 2 or keep.shape[0] != batch or keep.shape[1] == 0:
            raise InputError(f"keep_positions must be a tensor [batch={batch}, P] of positions with P >= 1")
        if keep.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise InputError(f"keep_positions must hold integer positions, got dtype {keep.dtype}")
        if int(keep.min()) < 0 or int(keep.max()) >= length:
            raise InputError(f"keep_positions must lie in [0, {length}), the sequence length")
        return keep.long()

    def _check_inputs(self, input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise InputError("input_ids must be a 2-D tensor [batch, length]; wrap a single sequence as [ids]")
        if input_ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        batch, length = input_ids.shape
        if batch == 0 or length == 0:
            raise InputError(f"empty batch: input_ids has shape {tuple(input_ids.shape)}; pass at least one token")
        if length > self.args.max_position_embeddings:
            raise InputError(
                f"sequence length {length} exceeds max_position_embeddings={self.args.max_position_embeddings}; "
                "truncate the input (tokenizer max_length)"
            )
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.args.vocab_size:
            bad = low if low < 0 else high
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.args.vocab_size}); check the tokenizer")
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


def attention_mask_4d(
    attention_mask: torch.Tensor, query_positions: torch.Tensor | None = None, prefix_length: int = 0
) -> torch.Tensor | None:
    """Boolean [B, 1, Q, S + T] mask: causal, and no real query ever sees a padding key.

    Every position may also see itself, so that no row is fully masked: a
    padding query then attends to itself (its result is never read) and
    softmax never divides by zero, so no NaN can appear in any dtype.
    prefix_length S: keys of a shared prefix come first, seen by every query.
    Returns None where there is no padding and every position is a query,
    for the plain causal kernel.
    """
    if query_positions is None and not prefix_length and bool(attention_mask.all()):
        return None
    if prefix_length:  # the prefix is S real tokens before each row; queries are the row's own positions
        batch = attention_mask.shape[0]
        own = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand(batch, -1)
        queries = prefix_length + (own if query_positions is None else query_positions)
        prefix_mask = attention_mask.new_ones(batch, prefix_length)
        return attention_mask_4d(torch.cat((prefix_mask, attention_mask), dim=1), queries)
    batch, length = attention_mask.shape
    keys = torch.arange(length, device=attention_mask.device)
    queries = keys.expand(batch, -1) if query_positions is None else query_positions
    causal = keys[None, None, :] <= queries[:, :, None]  # [B, Q, T]
    allowed = causal & attention_mask.bool()[:, None, :]
    allowed |= keys[None, None, :] == queries[:, :, None]
    return allowed[:, None]


def _gather_routing(routing: LayerRouting, keep: torch.Tensor, length: int) -> LayerRouting:
    """One layer's routing (flat over B*T tokens) at the kept positions only (flat over B*P)."""
    batch = keep.shape[0]

    def pick(t):
        return gather_positions(t.reshape(batch, length, -1), keep).reshape(-1, t.shape[-1])

    return LayerRouting(pick(routing.logits), pick(routing.probs), pick(routing.topk_ids), pick(routing.topk_weights))
