"""Qwen1.5-MoE (Qwen/Qwen1.5-MoE-A2.7B): q/k/v bias, a shared expert scaled by a sigmoid gate,
MoE layers chosen by decoder_sparse_step and mlp_only_layers."""

from ..config import ConfigReader, ModelArgs
from ..layout import NameMap, Tensor, attention, block_norms, mlp, routed_experts

MODEL_TYPE = "qwen2_moe"
HUB_ID = "Qwen/Qwen1.5-MoE-A2.7B"


def args_from_config(cfg: ConfigReader) -> ModelArgs:
    num_experts = cfg.positive("num_experts")
    top_k = cfg.positive("num_experts_per_tok")
    cfg.check_top_k(top_k, num_experts)
    if cfg.get("use_sliding_window", bool, False):
        raise cfg.error("use_sliding_window", "is true; sliding-window attention is not supported (the released model has it off)")
    common = cfg.common()
    num_layers = common["num_layers"]
    step = cfg.positive("decoder_sparse_step", 1)
    mlp_only = cfg.get("mlp_only_layers", list, [])
    bad = [i for i in mlp_only if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers]
    if bad:
        raise cfg.error("mlp_only_layers", f"has entries {bad} that are not layer indices in [0, {num_layers})")
    moe_layers = tuple(i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0)
    if not moe_layers:
        raise cfg.error(
            "mlp_only_layers",
            f"{mlp_only} with decoder_sparse_step {step} leaves no MoE layer among {num_layers}; at least one is needed",
        )
    shared_size = cfg.get("shared_expert_intermediate_size", int, 0)
    if shared_size < 0:
        raise cfg.error("shared_expert_intermediate_size", f"must be zero or positive, got {shared_size}")
    return ModelArgs(
        family=MODEL_TYPE,
        num_experts=num_experts,
        top_k=top_k,
        expert_size=cfg.positive("moe_intermediate_size"),
        moe_layers=moe_layers,
        # intermediate_size is always present in the released configs, even where no layer is dense.
        dense_size=cfg.positive("intermediate_size") if len(moe_layers) < num_layers else 0,
        shared_expert_size=shared_size,
        shared_expert_gated=shared_size > 0,  # the gate scales the shared expert; without one there is none
        # Older configs (the released one) have no qkv_bias field: the bias is always there.
        qkv_bias=cfg.get("qkv_bias", bool, True),
        **common,
    )


def layer_names(args: ModelArgs, layer: int) -> NameMap:
    ckpt, ours = f"model.layers.{layer}.mlp", f"layers.{layer}.mlp"
    names = {**block_norms(args, layer), **attention(args, layer)}
    if layer not in args.moe_layers:
        return {**names, **mlp(ckpt, ours, args.hidden_size, args.dense_size)}
    names.update(routed_experts(args, layer))
    if args.shared_expert_size:
        names.update(mlp(f"{ckpt}.shared_expert", f"{ours}.shared", args.hidden_size, args.shared_expert_size))
        names[f"{ours}.shared_gate.weight"] = Tensor(f"{ckpt}.shared_expert_gate.weight", (1, args.hidden_size))
    return names
