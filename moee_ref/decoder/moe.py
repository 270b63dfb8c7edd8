"""The MoE layer: a router that picks top_k of E experts per token, the experts, and shared experts.

The router's softmax over all experts (`LayerRouting.probs`) is what the
paper reads as the routing-weight embedding; it is returned as a result of
the layer, not observed from the side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .layers import Linear, SwiGLU


@dataclass
class LayerRouting:
    """What the router of one MoE layer decided, for N tokens."""

    logits: torch.Tensor  # [N, E] float32, before softmax
    probs: torch.Tensor  # [N, E] float32, softmax over all experts
    topk_ids: torch.Tensor  # [N, k] experts that process each token
    topk_weights: torch.Tensor  # [N, k] float32, the weights their outputs are mixed with

    def placed(self, rows: torch.Tensor, total: int) -> "LayerRouting":
        """This routing of some token rows, spread over `total` rows; the others (padding) are zero."""
        return self._map(lambda t: t.new_zeros((total, t.shape[-1])).index_copy_(0, rows, t))

    def at(self, keep: torch.Tensor, length: int) -> "LayerRouting":
        """This routing (flat over B*T tokens) at the kept positions keep [B, P] only (flat over B*P)."""
        index = keep[..., None]
        return self._map(lambda t: t.reshape(len(keep), length, -1).gather(1, index.expand(-1, -1, t.shape[-1])).reshape(-1, t.shape[-1]))

    def _map(self, fn) -> "LayerRouting":
        return LayerRouting(fn(self.logits), fn(self.probs), fn(self.topk_ids), fn(self.topk_weights))


class Router(nn.Module):
    """Softmax over all experts, then the top k; renormalised, or scaled by a constant.

    DeepSeek-V2's group-limited form first keeps the topk_group of num_groups expert groups whose best
    expert scores highest, and takes the top k among their experts only. `probs` stays the softmax over
    all experts either way: the distribution the chosen weights are read from.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.hidden_size))
        self.bias = nn.Parameter(torch.empty(args.num_experts)) if args.router_bias else None
        self.top_k, self.norm_topk_prob = args.top_k, args.norm_topk_prob
        self.num_groups, self.topk_group, self.scaling = args.num_groups, args.topk_group, args.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> LayerRouting:
        logits = self.logits(x).float()
        probs = logits.softmax(dim=-1)
        weights, ids = expert_candidates(probs, self.num_groups, self.topk_group).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        elif self.scaling != 1.0:
            weights = weights * self.scaling
        return LayerRouting(logits, probs, ids, weights)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # In at least float32 whatever the compute dtype: the logits decide the top-k and are the RW embedding,
        # and a bf16 product would round them to 3 digits (the matrix is tiny: E x D).
        compute = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(compute), self.weight.to(compute), None if self.bias is None else self.bias.to(compute))


def expert_candidates(probs: torch.Tensor, num_groups: int = 1, topk_group: int = 1) -> torch.Tensor:
    """probs [..., E] with the experts outside the topk_group best groups set to zero (a group's score is
    its best expert's); all of them kept without groups."""
    if num_groups == 1:
        return probs
    groups = probs.unflatten(-1, (num_groups, -1))
    best = groups.max(dim=-1).values.topk(topk_group, dim=-1).indices
    keep = torch.zeros(groups.shape[:-1], dtype=torch.bool, device=probs.device).scatter_(-1, best, True)
    return groups.masked_fill(~keep[..., None], 0.0).flatten(-2)


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked tensors and run only on the tokens routed to them.

    gpt-oss's variant: a bias on each projection and a clamped SwiGLU (see `activate`).
    """

    def __init__(self, num_experts: int, dim: int, size: int, bias: bool = False, clamped_swiglu: tuple[float, float] | None = None):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * size, dim))  # [gate; up] of each expert
        self.down = nn.Parameter(torch.empty(num_experts, dim, size))
        self.gate_up_bias = nn.Parameter(torch.empty(num_experts, 2 * size)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(num_experts, dim)) if bias else None
        self.clamped_swiglu = clamped_swiglu

    @property
    def plain(self) -> bool:
        """No biases and the plain SwiGLU: what every kernel in kernels/ computes."""
        return self.gate_up_bias is None and self.clamped_swiglu is None

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.clamped_swiglu is None:
            return F.silu(gate) * up
        alpha, limit = self.clamped_swiglu
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return (up + 1) * gate * torch.sigmoid(alpha * gate)

    def biases(self, expert: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.gate_up_bias is None:
            return None, None
        return self.gate_up_bias[expert], self.down_bias[expert]

    @property
    def num_experts(self) -> int:
        return len(self.gate_up)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], ids and weights [N, k] -> sum over each token's k experts of weight * expert(x)."""
        # Group the (token, expert) assignments by expert once, so that each active
        # expert runs one matmul pair over a contiguous block of its tokens.
        top_k = ids.shape[-1]
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of = order // top_k
        slot_weights = weights.reshape(-1)[order, None].to(x.dtype)
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        return self.mix(x, token_of, slot_weights, counts)

    def mix(self, x, token_of, slot_weights, counts) -> torch.Tensor:
        """One expert at a time, adding its weighted outputs as it goes: no [N * k, D] copy of the input."""
        result = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                rows = token_of[start : start + count]
                result.index_add_(0, rows, self.run_expert(expert, x[rows]) * slot_weights[start : start + count])
            start += count
        return result

    def run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's SwiGLU on its tokens x [n, D]."""
        gate_up_bias, down_bias = self.biases(expert)
        gate, up = F.linear(x, self.gate_up[expert], gate_up_bias).chunk(2, dim=-1)
        return F.linear(self.activate(gate, up), self.down[expert], down_bias)


class MoE(nn.Module):
    """Routed experts, plus the shared expert(s) that every token goes through where a family has them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.router = Router(args)
        self.experts = RoutedExperts(args.num_experts, args.hidden_size, args.expert_size, args.expert_bias, args.clamped_swiglu)
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
