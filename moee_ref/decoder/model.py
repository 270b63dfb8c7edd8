"""The decoder: embeddings, N pre-norm blocks, final norm; routing as an output.

One class serves every family; what differs between them is decided by
ModelArgs (families/ reads it from config.json). The forward pass returns a
DecoderOutput whose `routing` holds every MoE layer's router logits,
probabilities and top-k choices: they are results of the computation, not
something observed from the side with hooks.

The loop over the blocks is written once, in `run_layers`. A `LayerPass` is
one batch on its way through the blocks, a `PrefixPass` a shared prefix on
its way; the resident model, `encode_prefix` and the layer-streamed mode
(loading/streamed.py) all drive them through that loop.
"""

from __future__ import annotations

import threading

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from ..errors import InputError
from ..progress import progress
from .args import ModelArgs
from .batch import BatchLayout, SharedPrefix, attention_mask_4d, check_batches, check_inputs, check_keep, check_prefix
from .layers import Attention, LatentAttention, RMSNorm, SwiGLU, gather_positions, rotary_cos_sin
from .moe import MoE, LayerRouting


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
        def gather(name: str) -> torch.Tensor:
            return torch.stack([getattr(r, name).reshape(batch, length, -1) for r in per_layer], dim=1)

        return cls(gather("logits"), gather("probs"), gather("topk_ids"), gather("topk_weights"), moe_layers)


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
        self.attn = LatentAttention(args) if args.latent_attention else Attention(args)
        self.mlp_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.is_moe = layer in args.moe_layers
        self.window = args.sliding_window if layer in args.sliding_layers else None  # None: sees every earlier key
        self.mlp = MoE(args) if self.is_moe else SwiGLU(args.hidden_size, args.dense_size)

    def forward(self, x, cos, sin, mask, keep=None, real=None, past=None) -> tuple[torch.Tensor, LayerRouting | None]:
        """keep [B, P]: return only these positions (queries and MLP run on them alone).

        real [B * T] bool (with keep None): the attention's projections, the MLP
        and the router run on these token rows only. Padding rows get zero
        projections, a zero MLP output and zero routing: their keys are masked
        and nothing reads the rest, and on batches of unequal lengths they are a
        third of the work.
        past: keys and values of a shared prefix, put before x's own.
        """
        rows = None if real is None else real.nonzero().squeeze(1)
        residual = x if keep is None else gather_positions(x, keep)
        x = residual + self.attn(self.attn_norm(x), cos, sin, mask, keep, past, rows=rows)
        batch, length, dim = x.shape
        flat = self.mlp_norm(x).reshape(-1, dim)
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
        mask = None
        if self.window is not None and x.shape[1] > self.window:
            mask = attention_mask_4d(torch.ones(x.shape[:2], dtype=torch.long, device=x.device), window=self.window)
        return (self(x, cos, sin, mask)[0] if feeds_next else None), keys_values


@dataclass
class LayerPass:
    """One padded batch on its way through the blocks: its hidden states and what every block needs to know."""

    x: torch.Tensor  # [B, T, D] hidden states (the streamed mode keeps them in its activation store)
    layout: BatchLayout
    cos: torch.Tensor
    sin: torch.Tensor
    num_layers: int
    keep: torch.Tensor | None = None  # [B, P]: the positions read after the last block
    continues_prefix: bool = False  # the rows continue a shared prefix: attend to its keys and values
    keep_layer_states: bool = False
    routing: list[LayerRouting] = field(default_factory=list)
    layer_states: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def start(cls, args: ModelArgs, x, attention_mask, *, keep=None, prefix_length=0, position_ids=None,
              keep_layer_states=False) -> "LayerPass":
        windows = {args.sliding_window} if args.sliding_layers else ()
        layout = BatchLayout.of(attention_mask, keep, prefix_length, position_ids, windows)
        cos, sin = rotary_cos_sin(layout.positions, args.rotary_dim, args.rope_theta, x.dtype, args.yarn)
        return cls(x, layout, cos, sin, args.num_layers, keep, prefix_length > 0, keep_layer_states)

    def step(self, block: Block, layer: int, past=None) -> None:
        """Run one block. The last block computes only the kept positions; the others every real token."""
        past = past if self.continues_prefix else None
        x, length = self.x, self.x.shape[1]
        full_mask, last_mask = self.layout.masks(block.window)
        if layer == self.num_layers - 1 and self.keep is not None:
            x, routing = block(x, self.cos, self.sin, last_mask, self.keep, past=past)
        else:
            x, routing = block(x, self.cos, self.sin, full_mask, real=self.layout.real_rows, past=past)
            if self.keep is not None and routing is not None:
                routing = routing.at(self.keep, length)
        if routing is not None:
            self.routing.append(routing)
        if self.keep_layer_states:
            last = layer == self.num_layers - 1
            self.layer_states.append(x if last or self.keep is None else gather_positions(x, self.keep))
        self.x = x

    def finish(self, norm: RMSNorm, moe_layers: tuple[int, ...]) -> DecoderOutput:
        hidden = norm(self.x)
        batch, length = hidden.shape[:2]
        states = tuple(self.layer_states) if self.keep_layer_states else None
        return DecoderOutput(hidden, Routing.stack(self.routing, moe_layers, batch, length), None, states)


@dataclass
class PrefixPass:
    """A shared prefix [1, S, D] on its way through the blocks, gathering each block's keys and values."""

    ids: tuple[int, ...]
    x: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    num_layers: int
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def start(cls, args: ModelArgs, ids, x) -> "PrefixPass":
        cos, sin = rotary_cos_sin(torch.arange(len(ids), device=x.device)[None], args.rotary_dim, args.rope_theta, x.dtype, args.yarn)
        return cls(tuple(int(i) for i in ids), x, cos, sin, args.num_layers)

    def past(self, block: Block, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.x, (k, v) = block.run_prefix(self.x, self.cos, self.sin, feeds_next=layer < self.num_layers - 1)
        self.keys.append(k)
        self.values.append(v)
        return k, v

    def result(self) -> SharedPrefix:
        return SharedPrefix(self.ids, self.keys, self.values)


def run_layers(blocks: Iterable[tuple[int, Block]], passes: list[LayerPass], prefix=None) -> None:
    """The one loop over the decoder blocks, for every batch in `passes`, block by block.

    prefix: a SharedPrefix (its keys and values are read) or a PrefixPass
    (they are computed here, in the same block, before the batches need them).
    blocks: (layer index, block) pairs; the streamed mode builds each block as it comes.
    """
    for layer, block in blocks:
        if prefix is None:
            past = None
        elif isinstance(prefix, PrefixPass):
            past = prefix.past(block, layer)
        else:
            past = prefix.past(layer)
        for batch in passes:
            batch.step(block, layer, past)
        del block  # the streamed mode frees a layer before it builds the one after next


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
        self.int8 = self.packed = False  # set by the loader: how the weights are held (kernels/)
        self.int8_kernel = self.prepared = None  # set by the loader with int8: its matmuls, its prepared cache
        self.dtype_reason: str | None = None  # set by the loader: why this compute dtype (kernels/precision.py)
        self._prefix: SharedPrefix | None = None  # the last prefix `run` encoded, reused while its ids stay
        self._prefix_lock = threading.Lock()  # threads embedding with one model share that cache

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype  # the compute dtype (a packed model keeps its embedding table as stored)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

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
        batch = self.start(input_ids, attention_mask, position_ids=position_ids, keep_positions=keep_positions,
                           prefix=prefix, return_layer_states=return_layer_states)
        run_layers(enumerate(self.layers), [batch], prefix)
        out = batch.finish(self.norm, self.args.moe_layers)
        if return_logits:
            if not self.with_lm_head:
                raise InputError("this model was loaded without its LM head (for embeddings); load it with lm_head=True for logits")
            head = self.embed.weight if self.lm_head is None else self.lm_head.weight
            out.logits = torch.nn.functional.linear(out.hidden_states, head.to(out.hidden_states.dtype))
        return out

    def start(self, input_ids, attention_mask=None, *, position_ids=None, keep_positions=None, prefix=None,
              return_layer_states=False) -> LayerPass:
        """A checked batch, embedded, ready for the blocks."""
        shift = 0 if prefix is None else check_prefix(prefix, len(self.layers))
        input_ids, attention_mask = check_inputs(self.args, input_ids, attention_mask, shift)
        if keep_positions is not None:
            keep_positions = check_keep(keep_positions, *input_ids.shape).to(self.device)
        # Inputs come from the tokenizer on the host; every tensor after this is made on the model's device.
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if position_ids is not None:
            position_ids = position_ids.to(self.device)
        return LayerPass.start(self.args, self.embed(input_ids).to(self.dtype), attention_mask, keep=keep_positions,
                               prefix_length=shift, position_ids=position_ids, keep_layer_states=return_layer_states)

    def encode_prefix(self, ids: list[int]) -> SharedPrefix:
        """Keys and values of every layer for the token ids `ids`, at positions 0..len(ids)-1."""
        input_ids, _ = check_inputs(self.args, torch.tensor([list(ids)]), None)
        input_ids = input_ids.to(self.device)
        prefix = PrefixPass.start(self.args, ids, self.embed(input_ids).to(self.dtype))
        run_layers(enumerate(self.layers), [], prefix)
        return prefix.result()

    # What every model answers (the layer-streamed one too): a list of batches in, their outputs out.
    layer_states_available = True

    def run(self, batches, *, position_ids=None, show_progress_bar: bool = False, prefix_ids=None, continues=None,
            return_layer_states: bool = False) -> Iterator[DecoderOutput]:
        """Decoder outputs for every (input_ids, attention_mask, keep_positions) batch, in order, one batch at a time.

        prefix_ids: tokens every batch flagged in `continues` starts with; those batches hold only what follows
        them. The prefix is encoded once (and kept while the same ids come again).
        The layer-streamed model (loading/streamed.py) takes the same arguments.
        """
        batches, continues = check_batches(self.args, batches, prefix_ids, continues, position_ids)
        prefix = self.shared_prefix(prefix_ids) if any(continues) else None

        def outputs():
            for i in progress(range(len(batches)), show_progress_bar, "embedding", "batch"):
                ids, mask, keep = batches[i]
                yield self(ids, mask, position_ids=None if position_ids is None else position_ids[i], keep_positions=keep,
                           return_layer_states=return_layer_states, prefix=prefix if continues[i] else None)

        return outputs()

    def shared_prefix(self, ids) -> SharedPrefix:
        """encode_prefix(ids), computed once while the same ids come again."""
        with self._prefix_lock:
            if self._prefix is None or self._prefix.ids != tuple(ids):
                self._prefix = self.encode_prefix(list(ids))
            return self._prefix
