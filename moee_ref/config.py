"""Model arguments: one typed view of a checkpoint's config.json.

The three supported families describe the same kind of decoder with
different field names and a few different features. Each family module turns
its config.json into this one dataclass; the model is then built from it
alone, so the forward pass never asks "which family am I?".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError


@dataclass(frozen=True)
class ModelArgs:
    family: str  # the config's model_type: "olmoe", "qwen2_moe" or "deepseek"
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

    def weight_bytes(self, bytes_per_param: int) -> int:
        return self.parameter_counts()[0] * bytes_per_param


# ---------------------------------------------------------------------------
# Reading config.json. Family modules use these helpers so that every missing
# or inconsistent field produces the same kind of message.


class ConfigReader:
    """Typed access to a config dict that names the field in every error."""

    def __init__(self, raw: dict[str, Any], origin: str):
        self.raw = raw
        self.origin = origin

    def error(self, field: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.origin}: field '{field}' {problem}")

    def get(self, field: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if field not in self.raw or self.raw[field] is None:
            if default is ...:
                raise self.error(field, "is missing; the checkpoint's config.json must define it")
            return default
        value = self.raw[field]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # JSON has one number type: accept 1.0 for an int field, 1 for a float field, never a bool.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if int in kinds and isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(field, f"must be {_kind_names(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.error(field, f"must be {_kind_names(kinds)}, got {value!r}")
        return value

    def positive(self, field: str, default: Any = ...) -> int:
        value = self.get(field, int, default)
        if value < 1:
            raise self.error(field, f"must be a positive integer, got {value}")
        return value

    def rope_theta(self) -> float:
        """rope_theta from either generation of config.json.

        Released checkpoints write rope_theta (and rope_scaling) at top level;
        transformers 5 writes rope_parameters = {"rope_type", "rope_theta"}.
        Only plain RoPE is used by the supported checkpoints.
        """
        params = self.raw.get("rope_parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise self.error("rope_parameters", f"must be an object, got {params!r}")
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type != "default":
                raise self.error("rope_parameters", f"has rope_type {rope_type!r}; only 'default' RoPE is supported")
            theta = ConfigReader(params, f"{self.origin} rope_parameters").get("rope_theta", float)
        else:
            scaling = self.raw.get("rope_scaling")
            if scaling is not None:
                raise self.error("rope_scaling", f"is {scaling!r}; only plain RoPE (rope_scaling null) is supported")
            theta = self.get("rope_theta", float)
        if theta <= 0:
            raise self.error("rope_theta", f"must be positive, got {theta}")
        return theta

    def attention_shape(self) -> dict[str, int]:
        hidden = self.positive("hidden_size")
        heads = self.positive("num_attention_heads")
        kv_heads = self.positive("num_key_value_heads", heads)
        if heads % kv_heads:
            raise self.error("num_key_value_heads", f"({kv_heads}) must divide num_attention_heads ({heads})")
        head_dim = self.get("head_dim", int, None)
        if head_dim is None:
            if hidden % heads:
                raise self.error("hidden_size", f"({hidden}) must be divisible by num_attention_heads ({heads})")
            head_dim = hidden // heads
        if head_dim % 2:
            raise self.error("head_dim", f"must be even for rotary embeddings, got {head_dim}")
        return dict(hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)

    def common(self) -> dict[str, Any]:
        """Fields every family spells the same way."""
        act = self.get("hidden_act", str, "silu")
        if act != "silu":
            raise self.error("hidden_act", f"is {act!r}; only 'silu' (SwiGLU) is supported")
        return dict(
            vocab_size=self.positive("vocab_size"),
            num_layers=self.positive("num_hidden_layers"),
            max_position_embeddings=self.positive("max_position_embeddings"),
            rope_theta=self.rope_theta(),
            rms_norm_eps=self.get("rms_norm_eps", float),
            norm_topk_prob=self.get("norm_topk_prob", bool, False),
            tie_word_embeddings=self.get("tie_word_embeddings", bool, False),
            **self.attention_shape(),
        )

    def check_top_k(self, top_k: int, num_experts: int, field: str = "num_experts_per_tok") -> None:
        if top_k > num_experts:
            raise self.error(field, f"({top_k}) cannot exceed the number of experts ({num_experts})")


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


# ---------------------------------------------------------------------------


def parse_config(raw: dict[str, Any], origin: str = "config.json") -> ModelArgs:
    """ModelArgs from a config dict, dispatching on its model_type."""
    from .families import FAMILIES

    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError(f"{origin}: field 'model_type' is missing; supported: {', '.join(FAMILIES)}")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ConfigError(
            f"{origin}: model_type {model_type!r} is not supported; supported model types: {', '.join(FAMILIES)}"
        )
    return family.args_from_config(ConfigReader(raw, origin))


def read_config(path: str | Path) -> ModelArgs:
    """ModelArgs from a config.json file (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json found; a checkpoint directory needs one")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); re-download the checkpoint's config.json") from exc
    return parse_config(raw, str(path))


FamilyParser = Callable[[ConfigReader], ModelArgs]
