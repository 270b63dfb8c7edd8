"""The building blocks every family shares, each written once: RMSNorm, rotary
embeddings, attention (grouped-query capable, with the q/k-norm, bias and
clipping variants as flags) and the SwiGLU MLP. moe.py has the router and
the experts; model.py assembles them into a decoder.

This is the reference arithmetic in plain torch. Faster kernels (oneDNN,
packed weights, int8) are subclasses in kernels/ that the loader swaps in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs


class Linear(nn.Linear):
    """nn.Linear without its random init: the weights always come from a checkpoint."""

    def reset_parameters(self) -> None:
        pass


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
        # In bf16, torch's CPU and CUDA attention kernels accumulate the scores and their softmax in float32.
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
