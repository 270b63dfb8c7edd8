"""The building blocks shared by all three families, each written once.

RMSNorm, rotary embeddings, attention (grouped-query capable, with the OLMoE
and Qwen variants as flags), the SwiGLU MLP, the router and the stacked
routed experts. model.py assembles them into a decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .matmul import linear, onednn_applies


class Linear(nn.Linear):
    """nn.Linear through `linear`, without nn.Linear's random init: the weights always come from a checkpoint."""

    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean square is taken in at least float32, as the reference
        # implementations do: in bf16 it would lose most of its digits.
        compute = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(compute)
        normed = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin tables [B, T, head_dim] for the given positions [B, T].

    Angles are computed in float32, like the training code of all three
    models: doing it in float64 would differ from what the weights saw.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] at positions [B, P] -> [B, P, ...]."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x [B, H, T, head_dim] by the position angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        q_out, kv_out = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.q_proj = Linear(args.hidden_size, q_out, bias=args.qkv_bias)
        self.k_proj = Linear(args.hidden_size, kv_out, bias=args.qkv_bias)
        self.v_proj = Linear(args.hidden_size, kv_out, bias=args.qkv_bias)
        self.o_proj = Linear(q_out, args.hidden_size, bias=False)
        # OLMoE normalises q and k over the whole projection (all heads at once), before RoPE.
        self.q_norm = RMSNorm(q_out, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(kv_out, args.rms_norm_eps) if args.qk_norm else None
        self.clip_qkv = args.clip_qkv

    def forward(self, x, cos, sin, mask, keep: torch.Tensor | None = None, past: tuple | None = None) -> torch.Tensor:
        """Causal self-attention over x [B, T, D].

        keep [B, P]: compute queries (and the output) only at these positions;
        keys and values still cover every position. The embedding reads one
        position of the last layer, so there it skips most of the work.
        past: keys and values [1, kv_heads, S, head_dim] of a prefix of S
        tokens that every row continues (computed once, see `keys_values`);
        they come before x's own keys, and mask [B, 1, ., S + T] covers them.
        mask: boolean [B, 1, P or T, T], or None for plain causal attention.
        """
        batch, length, _ = x.shape
        x_q = x if keep is None else gather_positions(x, keep)
        q = self.q_proj(x_q)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.clip_qkv is not None:  # OLMoE clamps after the q/k norms
            q = q.clamp(-self.clip_qkv, self.clip_qkv)
        queries = q.shape[1]
        q = q.view(batch, queries, self.num_heads, self.head_dim).transpose(1, 2)
        if keep is None:
            q = apply_rotary(q, cos, sin)
        else:
            q = apply_rotary(q, gather_positions(cos, keep), gather_positions(sin, keep))
        k, v = self.keys_values(x, cos, sin)
        if past is not None:
            k = torch.cat((past[0].expand(batch, -1, -1, -1), k), dim=2)
            v = torch.cat((past[1].expand(batch, -1, -1, -1), v), dim=2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, queries, -1))

    def keys_values(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normed, clipped, rotated) and values [B, kv_heads, T, head_dim] of x [B, T, D]."""
        batch, length, _ = x.shape
        k, v = self.k_proj(x), self.v_proj(x)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.clip_qkv is not None:
            k, v = k.clamp(-self.clip_qkv, self.clip_qkv), v.clamp(-self.clip_qkv, self.clip_qkv)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(k, cos, sin), v


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP and the shared experts.

    gate and up stay two matrices, as in the checkpoints and in transformers,
    so that the float32 rounding is the reference's too.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.gate = Linear(dim, size, bias=False)
        self.up = Linear(dim, size, bias=False)
        self.down = Linear(size, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


@dataclass
class LayerRouting:
    """What the router of one MoE layer decided, for N tokens."""

    logits: torch.Tensor  # [N, E] float32, before softmax
    probs: torch.Tensor  # [N, E] float32, softmax over all experts
    topk_ids: torch.Tensor  # [N, k] experts that process each token
    topk_weights: torch.Tensor  # [N, k] float32, the weights their outputs are mixed with

    def placed(self, rows: torch.Tensor, total: int) -> "LayerRouting":
        """This routing of some token rows, spread over `total` rows; the others (padding) are zero."""

        def spread(t: torch.Tensor) -> torch.Tensor:
            return t.new_zeros((total, t.shape[-1])).index_copy_(0, rows, t)

        return LayerRouting(spread(self.logits), spread(self.probs), spread(self.topk_ids), spread(self.topk_weights))


class Router(nn.Module):
    """Softmax over all experts, then the top k; optionally renormalised."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.hidden_size))
        self.top_k, self.norm_topk_prob = args.top_k, args.norm_topk_prob

    def forward(self, x: torch.Tensor) -> LayerRouting:
        logits = linear(x, self.weight).float()
        probs = logits.softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return LayerRouting(logits, probs, ids, weights)


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked tensors and run only on the tokens routed to them."""

    def __init__(self, num_experts: int, dim: int, size: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * size, dim))
        self.down = nn.Parameter(torch.empty(num_experts, dim, size))

    @property
    def num_experts(self) -> int:
        return len(self.gate_up)  # stacked tensors, or one packed matrix per expert (checkpoint.fill_module)

    def expert_matrices(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """([2 * size, dim], [dim, size]) weights of one expert (the int8 variant dequantizes here)."""
        return self.gate_up[expert], self.down[expert]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # Group the (token, expert) assignments by expert once, so that each
        # active expert runs one matmul pair over a contiguous block of tokens.
        top_k = ids.shape[-1]
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of = order // top_k
        slot_weights = weights.reshape(-1)[order, None].to(x.dtype)
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        if self.grouped_mm_ok(x):
            out = self._all_experts_at_once(x[token_of], counts) * slot_weights
            return torch.zeros_like(x).index_add_(0, token_of, out)
        # One expert at a time, adding its weighted outputs as it goes: no [tokens * k, dim] copies of the input.
        result = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                rows = token_of[start : start + count]
                result.index_add_(0, rows, self.run_expert(expert, x[rows]) * slot_weights[start : start + count])
            start += count
        return result

    def grouped_mm_ok(self, x: torch.Tensor) -> bool:
        """torch's grouped matmul runs every expert's block in one call (same results, less overhead), but
        on the CPU through MKL: where oneDNN serves float32 (see `linear`), one call per expert is faster."""
        return (
            hasattr(F, "grouped_mm")
            and x.dtype in (torch.float32, torch.bfloat16)
            and type(self) is RoutedExperts
            and isinstance(self.gate_up, torch.Tensor)
            and not onednn_applies(x, self.gate_up)
        )

    def _all_experts_at_once(self, grouped: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ends = counts.cumsum(0).to(torch.int32)  # block e is rows [ends[e-1], ends[e])
        gate, up = F.grouped_mm(grouped, self.gate_up.transpose(1, 2), offs=ends).chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, self.down.transpose(1, 2), offs=ends)

    def run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's SwiGLU on its tokens x [n, dim]."""
        gate_up, down = self.expert_matrices(expert, x.dtype)
        gate, up = linear(x, gate_up).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, down)


class MoE(nn.Module):
    """Routed experts, plus the shared expert(s) that every token goes through where a family has them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.router = Router(args)
        self.experts = RoutedExperts(args.num_experts, args.hidden_size, args.expert_size)
        self.shared = SwiGLU(args.hidden_size, args.shared_expert_size) if args.shared_expert_size else None
        # Qwen scales its shared expert by sigmoid(w . x) per token; DeepSeekMoE adds its shared experts as they are.
        self.shared_gate = Linear(args.hidden_size, 1, bias=False) if args.shared_expert_gated else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, LayerRouting]:
        routing = self.router(x)
        out = self.experts(x, routing.topk_ids, routing.topk_weights)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        return out, routing
