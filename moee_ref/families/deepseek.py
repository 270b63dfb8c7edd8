"""DeepSeekMoE (deepseek-ai/deepseek-moe-16b-base): LLaMA attention, dense first layers,
n_shared_experts fused into one ungated MLP beside the routed experts.

Upstream this model ships remote code; none of it is used: config.json is
read as data and the math is written here.
"""

from ..config import ConfigReader, ModelArgs
from ..layout import NameMap, attention, block_norms, mlp, routed_experts

MODEL_TYPE = "deepseek"
HUB_ID = "deepseek-ai/deepseek-moe-16b-base"


def args_from_config(cfg: ConfigReader) -> ModelArgs:
    num_experts = cfg.positive("n_routed_experts")
    top_k = cfg.positive("num_experts_per_tok")
    cfg.check_top_k(top_k, num_experts)
    scoring = cfg.get("scoring_func", str, "softmax")
    if scoring != "softmax":
        raise cfg.error("scoring_func", f"is {scoring!r}; only 'softmax' routing is supported")
    if cfg.get("attention_bias", bool, False):
        raise cfg.error("attention_bias", "is true; DeepSeekMoE checkpoints have no attention bias and it is not supported")
    if cfg.get("pretraining_tp", int, 1) != 1:
        raise cfg.error("pretraining_tp", "must be 1 (tensor-parallel slicing of the weights is not supported)")
    common = cfg.common()
    num_layers = common["num_layers"]
    first_dense = cfg.get("first_k_dense_replace", int, 0)
    if not 0 <= first_dense <= num_layers:
        raise cfg.error("first_k_dense_replace", f"must lie in [0, {num_layers}], got {first_dense}")
    freq = cfg.positive("moe_layer_freq", 1)
    moe_layers = tuple(i for i in range(num_layers) if i >= first_dense and i % freq == 0)
    if not moe_layers:
        raise cfg.error(
            "first_k_dense_replace",
            f"({first_dense}) with moe_layer_freq {freq} leaves no MoE layer among {num_layers}; at least one is needed",
        )
    expert_size = cfg.positive("moe_intermediate_size")
    n_shared = cfg.get("n_shared_experts", int, 0)
    if n_shared < 0:
        raise cfg.error("n_shared_experts", f"must be zero or positive, got {n_shared}")
    return ModelArgs(
        family=MODEL_TYPE,
        num_experts=num_experts,
        top_k=top_k,
        expert_size=expert_size,
        moe_layers=moe_layers,
        dense_size=cfg.positive("intermediate_size") if len(moe_layers) < num_layers else 0,
        # The shared experts are stored fused as one MLP n_shared times as wide.
        shared_expert_size=n_shared * expert_size,
        **common,
    )


def layer_names(args: ModelArgs, layer: int) -> NameMap:
    ckpt, ours = f"model.layers.{layer}.mlp", f"layers.{layer}.mlp"
    names = {**block_norms(args, layer), **attention(args, layer)}
    if layer not in args.moe_layers:
        return {**names, **mlp(ckpt, ours, args.hidden_size, args.dense_size)}
    names.update(routed_experts(args, layer))
    if args.shared_expert_size:
        names.update(mlp(f"{ckpt}.shared_experts", f"{ours}.shared", args.hidden_size, args.shared_expert_size))
    return names
