"""Model arguments: everything the decoder is built from, as one dataclass.

The supported families describe the same kind of decoder with different
config.json field names and a few different features; each family file turns
its config into this one dataclass (families/), so the forward pass never
asks "which family am I?".
"""

from __future__ import annotations

from dataclasses import dataclass


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
    qk_norm: bool = False  # OLMoE: RMSNorm over the whole q and k projections
    qkv_bias: bool = False  # Qwen: bias on the q, k and v projections
    clip_qkv: float | None = None  # OLMoE option: clamp q, k, v to [-c, c]
    tie_word_embeddings: bool = False

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.moe_layers)

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
        if self.qkv_bias:
            attention += q_out + 2 * kv_out
        if self.qk_norm:
            attention += q_out + kv_out
        expert = 3 * d * self.expert_size
        shared = 3 * d * self.shared_expert_size + (d if self.shared_expert_gated else 0)
        moe_fixed = self.num_experts * d + shared  # router and shared experts run for every token
        dense = 3 * d * self.dense_size
        n_moe, n_dense = len(self.moe_layers), self.num_layers - len(self.moe_layers)
        outside = self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d
        common = outside + self.num_layers * attention + n_moe * moe_fixed + n_dense * dense
        return common + n_moe * self.num_experts * expert, common + n_moe * self.top_k * expert
