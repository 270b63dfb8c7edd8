"""Model arguments: everything the decoder is built from, as one dataclass.

The supported families describe the same kind of decoder with different
config.json field names and a few different features; each family file turns
its config into this one dataclass (families/), so the forward pass never
asks "which family am I?".
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Yarn:
    """YaRN rotary scaling (DeepSeek-V2's configs): low frequencies interpolated by `factor`, high ones kept,
    a linear ramp between the dimensions that turn beta_fast and beta_slow times over the original context."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # the cos/sin multiplier; None: derived from factor and the mscales
    truncate: bool = True  # round the ramp's ends to whole dimensions

    def magnitude(self, mscale: float = 1.0) -> float:
        return 1.0 if self.factor <= 1 else 0.1 * mscale * math.log(self.factor) + 1.0

    def cos_sin_factor(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self.magnitude(self.mscale) / self.magnitude(self.mscale_all_dim)
        return self.magnitude()


@dataclass(frozen=True)
class LatentAttentionArgs:
    """DeepSeek-V2's multi-head latent attention: keys and values from one low-rank latent per token,
    queries optionally too; each q/k head is a part without position and a rotary part shared by all heads."""

    kv_lora_rank: int
    q_lora_rank: int  # 0: queries straight from the hidden state
    nope_dim: int  # q/k head part without rotary position
    rope_dim: int  # q/k head part with it (the keys' one is shared by every head)
    value_dim: int  # value head size


@dataclass(frozen=True)
class ModelArgs:
    family: str  # the config's model_type, a key of families.FAMILIES
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # fewer than num_heads means grouped-query attention
    head_dim: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    # Routed experts.
    num_experts: int
    top_k: int
    expert_size: int  # intermediate size of one routed expert
    norm_topk_prob: bool  # renormalise the top-k probabilities to sum to one
    moe_layers: tuple[int, ...]  # decoder layers whose MLP is a mixture of experts
    dense_size: int  # intermediate size of the plain MLP of the other layers (0: there are none)
    # Shared experts, applied to every token beside the routed ones.
    shared_expert_size: int = 0  # 0: no shared expert
    shared_expert_gated: bool = False  # Qwen scales it by sigmoid(w . x); DeepSeekMoE does not
    # Attention variants.
    qk_norm: str | None = None  # RMSNorm of q and k: over the whole projection ("projection", OLMoE) or each head ("head", Qwen3)
    qkv_bias: bool = False  # Qwen: bias on the q, k and v projections
    clip_qkv: float | None = None  # OLMoE option: clamp q, k, v to [-c, c]
    o_bias: bool = False  # gpt-oss: a bias on the output projection too
    attention_sinks: bool = False  # gpt-oss: a learned logit per head that takes part in the softmax and is dropped
    sliding_window: int | None = None  # a query sees only the keys less than this many positions back ...
    sliding_layers: tuple[int, ...] = ()  # ... in these layers (Mixtral and Qwen3-MoE where configured: all)
    tie_word_embeddings: bool = False
    latent_attention: LatentAttentionArgs | None = None  # DeepSeek-V2's MLA instead of q/k/v projections
    yarn: Yarn | None = None  # rotary scaling; None: plain RoPE
    attention_scale: float | None = None  # the softmax scale; None: 1 / sqrt(head_dim)
    # Router variants (DeepSeek-V2): pick the top k only among the topk_group expert groups (of num_groups)
    # with the best expert in them; weights not renormalised are multiplied by routed_scaling_factor.
    num_groups: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_bias: bool = False  # gpt-oss: logits = W x + b
    # gpt-oss's experts: biases on both projections, and a clamped SwiGLU (alpha, limit):
    # (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit).
    expert_bias: bool = False
    clamped_swiglu: tuple[float, float] | None = None
    # How the checkpoint stores the routed experts: one tensor per expert and projection as released, or
    # fused [E, 2I, D] gate_up and [E, D, I] down tensors as transformers 5 holds them (read from the shards).
    fused_experts: bool = False
    mxfp4_experts: bool = False  # gpt-oss's released experts: MXFP4 blocks and scales, dequantized as they are read

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.moe_layers)

    @property
    def rotary_dim(self) -> int:
        """Width of the rotated part of a q/k head."""
        return self.latent_attention.rope_dim if self.latent_attention else self.head_dim

    @property
    def routing_dim(self) -> int:
        """Width of the routing-weight (RW) embedding: MoE layers x experts."""
        return len(self.moe_layers) * self.num_experts

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active) parameters; active counts only top_k routed experts per token.

        Embedding and output matrices are counted once each (the published
        sizes count them so); norms, router and biases are included.
        """
        d = self.hidden_size
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        attention = d * q_out + 2 * d * kv_out + q_out * d + 2 * d  # projections + two layer norms
        if self.latent_attention:
            mla, heads = self.latent_attention, self.num_heads
            q_head = mla.nope_dim + mla.rope_dim
            queries = d * heads * q_head if not mla.q_lora_rank else d * mla.q_lora_rank + mla.q_lora_rank * (1 + heads * q_head)
            latent = d * (mla.kv_lora_rank + mla.rope_dim) + mla.kv_lora_rank  # down projection and its norm
            attention = queries + latent + mla.kv_lora_rank * heads * (mla.nope_dim + mla.value_dim) + heads * mla.value_dim * d + 2 * d
        if self.qkv_bias:
            attention += q_out + 2 * kv_out
        attention += (d if self.o_bias else 0) + (self.num_heads if self.attention_sinks else 0)
        if self.qk_norm == "projection":
            attention += q_out + kv_out
        elif self.qk_norm == "head":
            attention += 2 * self.head_dim
        expert = 3 * d * self.expert_size + ((2 * self.expert_size + d) if self.expert_bias else 0)
        shared = 3 * d * self.shared_expert_size + (d if self.shared_expert_gated else 0)
        router = self.num_experts * (d + 1 if self.router_bias else d)
        moe_fixed = router + shared  # router and shared experts run for every token
        dense = 3 * d * self.dense_size
        n_moe, n_dense = len(self.moe_layers), self.num_layers - len(self.moe_layers)
        outside = self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d
        common = outside + self.num_layers * attention + n_moe * moe_fixed + n_dense * dense
        return common + n_moe * self.num_experts * expert, common + n_moe * self.top_k * expert
