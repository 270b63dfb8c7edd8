"""Reading config.json: typed access that names the field in every error.

Family files read their configs through ConfigReader, so that every missing
or inconsistent field gives the same kind of message.
"""

from __future__ import annotations

import math
from typing import Any

from ..decoder.args import Yarn
from ..errors import ConfigError

# Ceilings far above any released MoE model, checked before anything proportional to a count is built:
# a config.json saying 10^8 layers must fail at once, not after a name map of that size exhausts memory.
COUNT_LIMITS = {
    "num_hidden_layers": 1024, "num_experts": 65536, "num_local_experts": 65536, "n_routed_experts": 65536, "num_experts_per_tok": 65536,
    "num_attention_heads": 4096, "num_key_value_heads": 4096, "n_shared_experts": 65536,
}
SIZE_LIMIT = 2**31 - 1  # any other width or count: what an int32 index reaches


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
        if isinstance(value, float) and not math.isfinite(value):  # JSON as Python reads it allows NaN and Infinity
            raise self.error(field, f"must be a finite number, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > COUNT_LIMITS.get(field, SIZE_LIMIT):
            raise self.error(field, f"is {value}, beyond any real model (at most {COUNT_LIMITS.get(field, SIZE_LIMIT)}); "
                                    "check that config.json is not damaged")
        return value

    def positive(self, field: str, default: Any = ...) -> int:
        value = self.get(field, int, default)
        if value < 1:
            raise self.error(field, f"must be a positive integer, got {value}")
        return value

    def between(self, field: str, low: float, high: float, default: Any = ...) -> float:
        """A number strictly between low and high."""
        value = self.get(field, float, default)
        if value is not None and not low < value < high:
            raise self.error(field, f"must lie strictly between {low:g} and {high:g}, got {value!r}")
        return value

    def rope_theta(self) -> float:
        return self.rope()[0]

    def rope(self, yarn_allowed: bool = False) -> tuple[float, Yarn | None]:
        """(rope_theta, YaRN scaling or None) from either generation of config.json.

        Released checkpoints write rope_theta (and rope_scaling) at top level;
        transformers 5 writes rope_parameters = {"rope_type", "rope_theta", ...}.
        Plain RoPE everywhere; YaRN where the family's checkpoints use it (yarn_allowed).
        """
        params = self.raw.get("rope_parameters")
        if params is not None:
            field, scaling = "rope_parameters", params
            if not isinstance(params, dict):
                raise self.error("rope_parameters", f"must be an object, got {params!r}")
            theta = ConfigReader(params, f"{self.origin} rope_parameters").get("rope_theta", float)
        else:
            field, scaling = "rope_scaling", self.raw.get("rope_scaling")
            if scaling is not None and not isinstance(scaling, dict):
                raise self.error("rope_scaling", f"must be an object or null, got {scaling!r}")
            theta = self.get("rope_theta", float)
        if theta <= 0:  # NaN and Infinity are refused by get()
            raise self.error("rope_theta", f"must be positive, got {theta}")
        rope_type = "default" if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "default":
            return theta, None
        supported = "'default' or 'yarn'" if yarn_allowed else "'default'"
        if rope_type != "yarn" or not yarn_allowed:
            if field == "rope_scaling":
                raise self.error("rope_scaling", f"is {scaling!r}; only plain RoPE (rope_scaling null) is supported")
            raise self.error(field, f"has rope_type {rope_type!r}; only {supported} is supported")
        return theta, self._yarn(ConfigReader(scaling, f"{self.origin} {field}"))

    def _yarn(self, cfg: "ConfigReader") -> Yarn:
        known = {"type", "rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                 "mscale", "mscale_all_dim", "attention_factor", "truncate"}
        unknown = sorted(set(cfg.raw) - known)
        if unknown:  # a YaRN variant this code does not compute (e.g. per-dimension factors) must not pass silently
            raise cfg.error(unknown[0], "is not a YaRN parameter moee-ref computes; this rope scaling is not supported")
        factor = cfg.get("factor", float)
        if factor < 1:
            raise cfg.error("factor", f"must be at least 1, got {factor}")
        yarn = Yarn(
            factor=factor, original_max_position_embeddings=cfg.positive("original_max_position_embeddings"),
            beta_fast=cfg.get("beta_fast", float, 32.0), beta_slow=cfg.get("beta_slow", float, 1.0),
            mscale=cfg.get("mscale", float, None), mscale_all_dim=cfg.get("mscale_all_dim", float, None),
            attention_factor=cfg.get("attention_factor", float, None), truncate=cfg.get("truncate", bool, True),
        )
        if not yarn.beta_fast > yarn.beta_slow > 0:
            raise cfg.error("beta_fast", f"({yarn.beta_fast}) must exceed beta_slow ({yarn.beta_slow}), both positive")
        return yarn

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
            rms_norm_eps=self.between("rms_norm_eps", 0, 1),  # a variance floor: tiny and positive
            norm_topk_prob=self.get("norm_topk_prob", bool, False),
            tie_word_embeddings=self.get("tie_word_embeddings", bool, False),
            **self.attention_shape(),
        )

    def sparse_step_layers(self, num_layers: int) -> tuple[int, ...]:
        """The MoE layers of the Qwen families: every decoder_sparse_step-th layer, less mlp_only_layers."""
        step = self.positive("decoder_sparse_step", 1)
        mlp_only = self.get("mlp_only_layers", list, [])
        bad = [i for i in mlp_only if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers]
        if bad:
            raise self.error("mlp_only_layers", f"has entries {bad} that are not layer indices in [0, {num_layers})")
        moe_layers = tuple(i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0)
        if not moe_layers:
            raise self.error(
                "mlp_only_layers",
                f"{mlp_only} with decoder_sparse_step {step} leaves no MoE layer among {num_layers}; at least one is needed",
            )
        return moe_layers

    def dense_first_layers(self, num_layers: int) -> tuple[int, ...]:
        """The MoE layers of the DeepSeek families: i >= first_k_dense_replace with i % moe_layer_freq == 0, as
        DeepSeek's released code reads them (transformers ignores moe_layer_freq)."""
        first_dense = self.get("first_k_dense_replace", int, 0)
        if not 0 <= first_dense <= num_layers:
            raise self.error("first_k_dense_replace", f"must lie in [0, {num_layers}], got {first_dense}")
        freq = self.positive("moe_layer_freq", 1)
        moe_layers = tuple(i for i in range(num_layers) if i >= first_dense and i % freq == 0)
        if not moe_layers:
            raise self.error(
                "first_k_dense_replace",
                f"({first_dense}) with moe_layer_freq {freq} leaves no MoE layer among {num_layers}; at least one is needed",
            )
        return moe_layers

    def non_negative(self, field: str, default: int = 0) -> int:
        value = self.get(field, int, default)
        if value < 0:
            raise self.error(field, f"must be zero or positive, got {value}")
        return value

    def sliding_window(self, num_layers: int, switch: str | None = "use_sliding_window") -> dict:
        """sliding_window and sliding_layers for ModelArgs: every layer slides when the window is on.

        switch: the field that turns the window on (Qwen's use_sliding_window); None where a window
        given is always used (Mixtral). 0 or null means no window (transformers 5 writes 0 for Qwen2-MoE).
        """
        on = self.get(switch, bool, False) if switch else True
        window = self.get("sliding_window", int, None) if on else None
        if window is not None and window < 0:
            raise self.error("sliding_window", f"must be a positive number of positions, 0 or null, got {window}")
        if not window:
            return {}
        return dict(sliding_window=window, sliding_layers=tuple(range(num_layers)))

    def num_experts(self, field: str = "num_experts") -> int:
        """The routed expert count: `field` as released (num_experts; Mixtral's num_local_experts), or the
        other spelling, which transformers 5 writes for every family."""
        other = "num_local_experts" if field == "num_experts" else "num_experts"
        if self.raw.get(field) is None and self.raw.get(other) is not None:
            field = other
        return self.positive(field)

    def check_top_k(self, top_k: int, num_experts: int, field: str = "num_experts_per_tok") -> None:
        if top_k > num_experts:
            raise self.error(field, f"({top_k}) cannot exceed the number of experts ({num_experts})")


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
