"""How checkpoint tensors become model parameters.

A family's name map says, for every parameter of MoEDecoder, which
checkpoint tensors it is made of: one tensor as it is, tensors concatenated
(gate and up projections fused into one matrix) or stacked (one slice per
routed expert). Each leaf carries the shape the checkpoint must have, so a
checkpoint is checked completely before a byte of weights is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Union

import torch

from .config import ModelArgs


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Cat:
    """Parts concatenated along dim 0, e.g. [gate; up] -> one [2 * size, dim] matrix."""

    parts: tuple["Recipe", ...]


@dataclass(frozen=True)
class Stack:
    """Parts stacked along a new dim 0, e.g. one slice per routed expert."""

    parts: tuple["Recipe", ...]


Recipe = Union[Tensor, Cat, Stack]
NameMap = dict[str, Recipe]  # model parameter name -> how to build it


def leaves(recipe: Recipe) -> Iterator[Tensor]:
    if isinstance(recipe, Tensor):
        yield recipe
    else:
        for part in recipe.parts:
            yield from leaves(part)


def shape_of(recipe: Recipe) -> tuple[int, ...]:
    if isinstance(recipe, Tensor):
        return recipe.shape
    first = shape_of(recipe.parts[0])
    if isinstance(recipe, Stack):
        return (len(recipe.parts), *first)
    return (sum(shape_of(part)[0] for part in recipe.parts), *first[1:])


def build(recipe: Recipe, read: Callable[[str], torch.Tensor], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Materialise one parameter, converting each leaf to dtype as it is read.

    Concatenated and stacked parameters are filled in place, leaf by leaf, so
    that building 64 experts never holds them twice (as pieces, then stacked).
    """
    if isinstance(recipe, Tensor):
        leaf = read(recipe.name)
        return leaf.to(dtype) if out is None else out.copy_(leaf)
    if out is None:
        out = torch.empty(shape_of(recipe), dtype=dtype)
    if isinstance(recipe, Stack):
        for i, part in enumerate(recipe.parts):
            build(part, read, dtype, out[i])
    else:
        start = 0
        for part in recipe.parts:
            rows = shape_of(part)[0]
            build(part, read, dtype, out[start : start + rows])
            start += rows
    return out


# ---------------------------------------------------------------------------
# Pieces of the name map that all three families spell the same way
# (they all follow the LLaMA naming of the Hugging Face checkpoints).


def expert(ckpt_prefix: str, dim: int, size: int) -> dict[str, Recipe]:
    """One routed expert stored as gate_proj, up_proj, down_proj; gate and up fused into one matrix."""
    return {
        "gate_up": Cat((Tensor(f"{ckpt_prefix}.gate_proj.weight", (size, dim)), Tensor(f"{ckpt_prefix}.up_proj.weight", (size, dim)))),
        "down": Tensor(f"{ckpt_prefix}.down_proj.weight", (dim, size)),
    }


def attention(args: ModelArgs, layer: int) -> NameMap:
    ckpt, ours = f"model.layers.{layer}.self_attn", f"layers.{layer}.attn"
    d, q_out, kv_out = args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    names: NameMap = {
        f"{ours}.q_proj.weight": Tensor(f"{ckpt}.q_proj.weight", (q_out, d)),
        f"{ours}.k_proj.weight": Tensor(f"{ckpt}.k_proj.weight", (kv_out, d)),
        f"{ours}.v_proj.weight": Tensor(f"{ckpt}.v_proj.weight", (kv_out, d)),
        f"{ours}.o_proj.weight": Tensor(f"{ckpt}.o_proj.weight", (d, q_out)),
    }
    if args.qkv_bias:
        for proj, width in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            names[f"{ours}.{proj}.bias"] = Tensor(f"{ckpt}.{proj}.bias", (width,))
    return names


def block_norms(args: ModelArgs, layer: int) -> NameMap:
    d = (args.hidden_size,)
    return {
        f"layers.{layer}.attn_norm.weight": Tensor(f"model.layers.{layer}.input_layernorm.weight", d),
        f"layers.{layer}.mlp_norm.weight": Tensor(f"model.layers.{layer}.post_attention_layernorm.weight", d),
    }


def routed_experts(args: ModelArgs, layer: int) -> NameMap:
    """Router and experts stored one by one as mlp.experts.{e}.*_proj; stacked here."""
    ckpt, ours = f"model.layers.{layer}.mlp", f"layers.{layer}.mlp"
    per_expert = [expert(f"{ckpt}.experts.{e}", args.hidden_size, args.expert_size) for e in range(args.num_experts)]
    return {
        f"{ours}.router.weight": Tensor(f"{ckpt}.gate.weight", (args.num_experts, args.hidden_size)),
        f"{ours}.experts.gate_up": Stack(tuple(p["gate_up"] for p in per_expert)),
        f"{ours}.experts.down": Stack(tuple(p["down"] for p in per_expert)),
    }


def mlp(ckpt_prefix: str, our_prefix: str, dim: int, size: int) -> NameMap:
    """A plain SwiGLU module (dense layer or shared expert) under our_prefix."""
    return {
        f"{our_prefix}.gate.weight": Tensor(f"{ckpt_prefix}.gate_proj.weight", (size, dim)),
        f"{our_prefix}.up.weight": Tensor(f"{ckpt_prefix}.up_proj.weight", (size, dim)),
        f"{our_prefix}.down.weight": Tensor(f"{ckpt_prefix}.down_proj.weight", (dim, size)),
    }


def outer(args: ModelArgs) -> tuple[NameMap, NameMap]:
    """Parameters outside the blocks: (before the first block, after the last)."""
    d = args.hidden_size
    before: NameMap = {"embed.weight": Tensor("model.embed_tokens.weight", (args.vocab_size, d))}
    after: NameMap = {"norm.weight": Tensor("model.norm.weight", (d,))}
    if not args.tie_word_embeddings:
        after["lm_head.weight"] = Tensor("lm_head.weight", (args.vocab_size, d))
    return before, after
