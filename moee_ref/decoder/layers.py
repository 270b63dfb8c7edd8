"""The building blocks every family shares, each written once: RMSNorm, rotary
embeddings, attention (grouped-query capable, with the q/k-norm, bias and
clipping variants as flags) and the SwiGLU MLP. moe.py has the router and
the experts; model.py assembles them into a decoder.

This is the reference arithmetic in plain torch. Faster kernels (oneDNN,
packed weights, int8) are subclasses in kernels/ that the loader swaps in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs, Yarn


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


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, yarn: Yarn | None = None):
    """cos and sin tables [B, T, head_dim] for the given positions [B, T].

    Angles are computed in float32, like the training code of all these
    models: doing it in float64 would differ from what the weights saw.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    scale = 1.0
    if yarn is not None:
        inv_freq, scale = yarn_frequencies(inv_freq, head_dim, theta, yarn), yarn.cos_sin_factor()
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def yarn_frequencies(inv_freq: torch.Tensor, head_dim: int, theta: float, yarn: Yarn) -> torch.Tensor:
    """YaRN: frequencies that turn fewer than beta_slow times over the original context are divided by
    the factor (interpolated), those turning more than beta_fast times kept, a linear ramp in between."""

    def dimension_turning(turns: float) -> float:  # the dimension whose frequency turns `turns` times
        return head_dim * math.log(yarn.original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_turning(yarn.beta_fast), dimension_turning(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp  # 1: the original frequency (extrapolated), 0: the interpolated one
    return inv_freq / yarn.factor * (1 - kept) + inv_freq * kept


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] at positions [B, P] -> [B, P, ...]."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def on_rows(project, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """project(x) for x [B, T, D], computed at the flat positions `rows` only (the real tokens) and zero at the
    others (padding: masked as keys, never read as queries). rows None: every position."""
    if rows is None:
        return project(x)
    flat = x.reshape(-1, x.shape[-1])
    out = project(flat[rows])
    return out.new_zeros(len(flat), out.shape[-1]).index_copy_(0, rows, out).view(*x.shape[:-1], -1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x [B, H, T, head_dim] by the position angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")  # its matrices, for int8

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        q_out, kv_out = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.q_proj = Linear(args.hidden_size, q_out, bias=args.qkv_bias)
        self.k_proj = Linear(args.hidden_size, kv_out, bias=args.qkv_bias)
        self.v_proj = Linear(args.hidden_size, kv_out, bias=args.qkv_bias)
        self.o_proj = Linear(q_out, args.hidden_size, bias=args.o_bias)
        # gpt-oss: a learned logit per head beside the keys' scores; it takes a share of the softmax and is dropped.
        self.sinks = nn.Parameter(torch.empty(args.num_heads)) if args.attention_sinks else None
        # q and k are normalised before RoPE: OLMoE over the whole projection (all heads at once),
        # Qwen3 over each head with one weight shared by all heads.
        self.qk_norm = args.qk_norm
        q_width, kv_width = (q_out, kv_out) if args.qk_norm == "projection" else (args.head_dim, args.head_dim)
        self.q_norm = RMSNorm(q_width, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(kv_width, args.rms_norm_eps) if args.qk_norm else None
        self.clip_qkv = args.clip_qkv
        self.scale = args.attention_scale  # None: 1 / sqrt(head_dim)

    def forward(self, x, cos, sin, mask, keep: torch.Tensor | None = None, past: tuple | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention over x [B, T, D].

        keep [B, P]: compute queries (and the output) only at these positions;
        keys and values still cover every position. The embedding reads one
        position of the last layer, so there it skips most of the work.
        past: keys and values [1, kv_heads, S, head_dim] of a prefix of S
        tokens that every row continues (computed once, see `keys_values`);
        they come before x's own keys, and mask [B, 1, ., S + T] covers them.
        mask: boolean [B, 1, P or T, T], or None for plain causal attention.
        rows (with keep None): the flat positions of real tokens; the projections skip padding (`on_rows`).
        """
        batch, length, _ = x.shape
        x_q = x if keep is None else gather_positions(x, keep)
        q_rows = rows if keep is None else None
        q = on_rows(self.q_proj, x_q, q_rows)
        if self.qk_norm == "projection":
            q = self.q_norm(q)
        if self.clip_qkv is not None:  # OLMoE clamps after the q/k norms
            q = q.clamp(-self.clip_qkv, self.clip_qkv)
        queries = q.shape[1]
        q = self.heads(q, self.num_heads, self.q_norm)
        if keep is None:
            q = apply_rotary(q, cos, sin)
        else:
            q = apply_rotary(q, gather_positions(cos, keep), gather_positions(sin, keep))
        k, v = self.keys_values(x, cos, sin, rows)
        if past is not None:
            k = torch.cat((past[0].expand(batch, -1, -1, -1), k), dim=2)
            v = torch.cat((past[1].expand(batch, -1, -1, -1), v), dim=2)
        if self.sinks is None:
            # In bf16, torch's CPU and CUDA attention kernels accumulate the scores and their softmax in float32.
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.num_kv_heads != self.num_heads, scale=self.scale
            )
        else:
            out = attention_with_sinks(q, k, v, mask, self.sinks, self.scale)
        return on_rows(self.o_proj, out.transpose(1, 2).reshape(batch, queries, -1), q_rows)

    def keys_values(self, x, cos, sin, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normed, clipped, rotated) and values [B, kv_heads, T, head_dim] of x [B, T, D]."""
        k, v = on_rows(self.k_proj, x, rows), on_rows(self.v_proj, x, rows)
        if self.qk_norm == "projection":
            k = self.k_norm(k)
        if self.clip_qkv is not None:
            k, v = k.clamp(-self.clip_qkv, self.clip_qkv), v.clamp(-self.clip_qkv, self.clip_qkv)
        k, v = self.heads(k, self.num_kv_heads, self.k_norm), self.heads(v, self.num_kv_heads)
        return apply_rotary(k, cos, sin), v

    def heads(self, x: torch.Tensor, count: int, norm: RMSNorm | None = None) -> torch.Tensor:
        """[B, T, count * head_dim] -> [B, count, T, head_dim], normed per head where the family does that."""
        x = x.view(*x.shape[:2], count, self.head_dim)
        if norm is not None and self.qk_norm == "head":
            x = norm(x)
        return x.transpose(1, 2)


def attention_with_sinks(q, k, v, mask, sinks: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax([q.k * scale, sink]) over the keys and one extra logit per head, the sink's share dropped:
    what gpt-oss computes, written out (torch's fused kernels have no sinks). Scores in at least float32.

    q [B, H, Q, d], k and v [B, kv_heads, S, d]; mask boolean [B, 1, Q, S] or None (causal, the last
    Q of S positions being the queries).
    """
    heads, length = q.shape[1], k.shape[2]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    if mask is None:
        queries = q.shape[2]
        mask = torch.ones(queries, length, dtype=torch.bool, device=q.device).tril(length - queries)
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(compute).view(1, heads, 1, 1).expand(*scores.shape[:-1], 1)
    weights = torch.cat((scores, sink), dim=-1).softmax(dim=-1)[..., :-1]
    return (weights @ v.to(compute)).to(q.dtype)


class LatentAttention(nn.Module):
    """DeepSeek-V2's multi-head latent attention (MLA).

    Keys and values of all heads are expanded from one normed latent of kv_lora_rank per token; each
    key head is [its own part without position; a rotary part shared by every head], queries the same
    shape ([nope; rope] per head, from a low-rank latent too where q_lora_rank is set). Same interface as
    Attention: `past` and `keys_values` hold the expanded keys and values.
    """

    projections = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj")  # for int8

    def __init__(self, args: ModelArgs):
        super().__init__()
        mla, d, heads = args.latent_attention, args.hidden_size, args.num_heads
        self.num_heads, self.nope_dim, self.rope_dim, self.value_dim = heads, mla.nope_dim, mla.rope_dim, mla.value_dim
        q_out = heads * (mla.nope_dim + mla.rope_dim)
        if mla.q_lora_rank:
            self.q_proj = None
            self.q_a_proj = Linear(d, mla.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(mla.q_lora_rank, 1e-6)  # eps fixed in the released code, not rms_norm_eps
            self.q_b_proj = Linear(mla.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj, self.q_a_proj, self.q_a_norm, self.q_b_proj = Linear(d, q_out, bias=False), None, None, None
        self.kv_a_proj = Linear(d, mla.kv_lora_rank + mla.rope_dim, bias=False)  # the latent and the shared rotary key
        self.kv_a_norm = RMSNorm(mla.kv_lora_rank, 1e-6)
        self.kv_b_proj = Linear(mla.kv_lora_rank, heads * (mla.nope_dim + mla.value_dim), bias=False)
        self.o_proj = Linear(heads * mla.value_dim, d, bias=False)
        self.scale = args.attention_scale

    def forward(self, x, cos, sin, mask, keep: torch.Tensor | None = None, past: tuple | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[0]
        x_q = x if keep is None else gather_positions(x, keep)
        q_rows = rows if keep is None else None
        q = on_rows(self.q_proj if self.q_proj is not None else lambda t: self.q_b_proj(self.q_a_norm(self.q_a_proj(t))), x_q, q_rows)
        queries = q.shape[1]
        q = q.view(batch, queries, self.num_heads, -1).transpose(1, 2)
        q_cos, q_sin = (cos, sin) if keep is None else (gather_positions(cos, keep), gather_positions(sin, keep))
        q = torch.cat((q[..., : self.nope_dim], self.rotated(q[..., self.nope_dim :], q_cos, q_sin)), dim=-1)
        k, v = self.keys_values(x, cos, sin, rows)
        if past is not None:
            k = torch.cat((past[0].expand(batch, -1, -1, -1), k), dim=2)
            v = torch.cat((past[1].expand(batch, -1, -1, -1), v), dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return on_rows(self.o_proj, out.transpose(1, 2).reshape(batch, queries, -1), q_rows)

    def keys_values(self, x, cos, sin, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [B, heads, T, nope + rope] and values [B, heads, T, value_dim] of x [B, T, D]."""
        batch, length, _ = x.shape
        latent, k_rope = on_rows(self.kv_a_proj, x, rows).split([self.kv_a_norm.weight.shape[0], self.rope_dim], dim=-1)
        kv = on_rows(lambda t: self.kv_b_proj(self.kv_a_norm(t)), latent, rows).view(batch, length, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.value_dim], dim=-1)
        k_rope = self.rotated(k_rope[:, None], cos, sin).expand(-1, self.num_heads, -1, -1)
        return torch.cat((k_nope, k_rope), dim=-1), v

    @staticmethod
    def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V2 rotates interleaved pairs (2i, 2i + 1). Gathering the even and then the odd dimensions
        turns that into apply_rotary's pairs (i, i + rope/2); the order is left so, since queries and keys
        get the same permutation and their dot products do not change."""
        return apply_rotary(torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1), cos, sin)


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
