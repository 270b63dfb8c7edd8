"""How a family names its checkpoint tensors, and the pieces most families share.

A family's name map says, for every parameter of MoEDecoder, which
checkpoint tensors it is made of: one tensor as it is, tensors concatenated
(gate and up projections fused into one matrix) or stacked (one slice per
routed expert). Each leaf carries the shape the checkpoint must have, so a
checkpoint is checked completely before a byte of weights is read
(loading/checkpoint.py builds the parameters from these recipes).

The helpers below spell the LLaMA-style names of the Hugging Face
checkpoints; every name is a parameter with that spelling as its default, so
a family whose checkpoint says `block_sparse_moe` or `w1` passes its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

from ..decoder.args import ModelArgs


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


@dataclass(frozen=True)
class Transposed:
    """A part with its last two dims swapped: gpt-oss as transformers holds it stores x @ W, not W x."""

    part: "Recipe"


@dataclass(frozen=True)
class Deinterleaved:
    """A part whose entries along `dim` alternate gate, up, gate, up...: reordered to [all gates; all ups]."""

    part: "Recipe"
    dim: int


@dataclass(frozen=True)
class Mxfp4:
    """gpt-oss's released experts in MXFP4: `blocks` [..., G, 16] bytes holding two 4-bit values each (low
    nibble first), `scales` [..., G] a power of two per block of 32 values (exponent + 127). [..., G * 32] values."""

    blocks: Tensor
    scales: Tensor

    @property
    def parts(self) -> tuple[Tensor, Tensor]:
        return (self.blocks, self.scales)


Recipe = Union[Tensor, Cat, Stack, Transposed, Deinterleaved, Mxfp4]
NameMap = dict[str, Recipe]  # model parameter name -> how to build it


def leaves(recipe: Recipe) -> Iterator[Tensor]:
    if isinstance(recipe, Tensor):
        yield recipe
    elif isinstance(recipe, (Transposed, Deinterleaved)):
        yield from leaves(recipe.part)
    else:
        for part in recipe.parts:
            yield from leaves(part)


def shape_of(recipe: Recipe) -> tuple[int, ...]:
    if isinstance(recipe, Tensor):
        return recipe.shape
    if isinstance(recipe, Deinterleaved):
        return shape_of(recipe.part)
    if isinstance(recipe, Transposed):
        inner = shape_of(recipe.part)
        return (*inner[:-2], inner[-1], inner[-2])
    if isinstance(recipe, Mxfp4):
        *outer, groups, width = recipe.blocks.shape
        return (*outer, groups * width * 2)
    first = shape_of(recipe.parts[0])
    if isinstance(recipe, Stack):
        return (len(recipe.parts), *first)
    return (sum(shape_of(part)[0] for part in recipe.parts), *first[1:])


def integer_leaves(groups) -> set[str]:
    """Names of the tensors stored as bytes, not floats (MXFP4 blocks and scales)."""
    names: set[str] = set()
    for group in groups:
        for recipe in group.values():
            stack = [recipe]
            while stack:
                r = stack.pop()
                if isinstance(r, Mxfp4):
                    names.update(leaf.name for leaf in r.parts)
                elif isinstance(r, (Transposed, Deinterleaved)):
                    stack.append(r.part)
                elif not isinstance(r, Tensor):
                    stack.extend(r.parts)
    return names


# ---------------------------------------------------------------------------
# The LLaMA naming of the Hugging Face checkpoints, parameterised.

LAYER = "model.layers.{layer}"
SWIGLU = ("gate_proj", "up_proj", "down_proj")  # a SwiGLU MLP's gate, up and down matrices


def swiglu_expert(ckpt_prefix: str, dim: int, size: int, projections: tuple[str, str, str] = SWIGLU) -> dict[str, Recipe]:
    """One routed expert stored as three matrices; gate and up fused into one [2 * size, dim] matrix."""
    gate, up, down = projections
    return {
        "gate_up": Cat((Tensor(f"{ckpt_prefix}.{gate}.weight", (size, dim)), Tensor(f"{ckpt_prefix}.{up}.weight", (size, dim)))),
        "down": Tensor(f"{ckpt_prefix}.{down}.weight", (dim, size)),
    }


def attention(args: ModelArgs, layer: int, module: str = "self_attn") -> NameMap:
    ckpt, ours = f"{LAYER.format(layer=layer)}.{module}", f"layers.{layer}.attn"
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
    if args.o_bias:
        names[f"{ours}.o_proj.bias"] = Tensor(f"{ckpt}.o_proj.bias", (d,))
    if args.attention_sinks:  # one learned logit per head (gpt-oss)
        names[f"{ours}.sinks"] = Tensor(f"{ckpt}.sinks", (args.num_heads,))
    if args.qk_norm:  # over the whole projection, all heads at once (OLMoE), or one norm shared by every head (Qwen3)
        q_width, kv_width = (q_out, kv_out) if args.qk_norm == "projection" else (args.head_dim, args.head_dim)
        names[f"{ours}.q_norm.weight"] = Tensor(f"{ckpt}.q_norm.weight", (q_width,))
        names[f"{ours}.k_norm.weight"] = Tensor(f"{ckpt}.k_norm.weight", (kv_width,))
    return names


def block_norms(args: ModelArgs, layer: int, names: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")) -> NameMap:
    d, ckpt = (args.hidden_size,), LAYER.format(layer=layer)
    return {
        f"layers.{layer}.attn_norm.weight": Tensor(f"{ckpt}.{names[0]}.weight", d),
        f"layers.{layer}.mlp_norm.weight": Tensor(f"{ckpt}.{names[1]}.weight", d),
    }


def routed_experts(
    args: ModelArgs, layer: int, module: str = "mlp", router: str = "gate", experts: str = "experts",
    projections: tuple[str, str, str] = SWIGLU,
) -> NameMap:
    """Router and experts stored one by one as {module}.{experts}.{e}.*, stacked here; or already fused."""
    ckpt, ours = f"{LAYER.format(layer=layer)}.{module}", f"layers.{layer}.mlp"
    router_weight = Tensor(f"{ckpt}.{router}.weight", (args.num_experts, args.hidden_size))
    if args.fused_experts:  # transformers 5's layout: gate and up already concatenated, as our parameters are
        return {
            f"{ours}.router.weight": router_weight,
            f"{ours}.experts.gate_up": Tensor(f"{ckpt}.{experts}.gate_up_proj", (args.num_experts, 2 * args.expert_size, args.hidden_size)),
            f"{ours}.experts.down": Tensor(f"{ckpt}.{experts}.down_proj", (args.num_experts, args.hidden_size, args.expert_size)),
        }
    per_expert = [swiglu_expert(f"{ckpt}.{experts}.{e}", args.hidden_size, args.expert_size, projections) for e in range(args.num_experts)]
    return {
        f"{ours}.router.weight": router_weight,
        f"{ours}.experts.gate_up": Stack(tuple(p["gate_up"] for p in per_expert)),
        f"{ours}.experts.down": Stack(tuple(p["down"] for p in per_expert)),
    }


def swiglu(ckpt_prefix: str, our_prefix: str, dim: int, size: int, projections: tuple[str, str, str] = SWIGLU) -> NameMap:
    """A plain SwiGLU module (dense layer or shared expert) under our_prefix."""
    gate, up, down = projections
    return {
        f"{our_prefix}.gate.weight": Tensor(f"{ckpt_prefix}.{gate}.weight", (size, dim)),
        f"{our_prefix}.up.weight": Tensor(f"{ckpt_prefix}.{up}.weight", (size, dim)),
        f"{our_prefix}.down.weight": Tensor(f"{ckpt_prefix}.{down}.weight", (dim, size)),
    }


def dense_mlp(args: ModelArgs, layer: int, module: str = "mlp") -> NameMap:
    """The plain MLP of a layer that is not MoE."""
    return swiglu(f"{LAYER.format(layer=layer)}.{module}", f"layers.{layer}.mlp", args.hidden_size, args.dense_size)


def outer(args: ModelArgs, embed: str = "model.embed_tokens.weight", norm: str = "model.norm.weight",
          head: str = "lm_head.weight") -> tuple[NameMap, NameMap]:
    """Parameters outside the blocks: (before the first block, after the last)."""
    d = args.hidden_size
    before: NameMap = {"embed.weight": Tensor(embed, (args.vocab_size, d))}
    after: NameMap = {"norm.weight": Tensor(norm, (d,))}
    if not args.tie_word_embeddings:
        after["lm_head.weight"] = Tensor(head, (args.vocab_size, d))
    return before, after
