"""OLMoE (allenai/OLMoE-1B-7B-0924): every layer is MoE; q/k RMSNorm; optional clip_qkv."""

from ..config import ConfigReader, ModelArgs
from ..layout import NameMap, Tensor, attention, block_norms, routed_experts

MODEL_TYPE = "olmoe"
HUB_ID = "allenai/OLMoE-1B-7B-0924"


def args_from_config(cfg: ConfigReader) -> ModelArgs:
    num_experts = cfg.positive("num_experts")
    top_k = cfg.positive("num_experts_per_tok")
    cfg.check_top_k(top_k, num_experts)
    clip_qkv = cfg.get("clip_qkv", float, None)
    if clip_qkv is not None and clip_qkv <= 0:
        raise cfg.error("clip_qkv", f"must be positive or null, got {clip_qkv}")
    if cfg.get("attention_bias", bool, False):
        raise cfg.error("attention_bias", "is true; OLMoE checkpoints have no attention bias and it is not supported")
    common = cfg.common()
    return ModelArgs(
        family=MODEL_TYPE,
        num_experts=num_experts,
        top_k=top_k,
        expert_size=cfg.positive("intermediate_size"),  # OLMoE's intermediate_size is the expert size
        moe_layers=tuple(range(common["num_layers"])),
        dense_size=0,
        qk_norm=True,
        clip_qkv=clip_qkv,
        **common,
    )


def layer_names(args: ModelArgs, layer: int) -> NameMap:
    q_out, kv_out = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    ckpt = f"model.layers.{layer}.self_attn"
    return {
        **block_norms(args, layer),
        **attention(args, layer),
        f"layers.{layer}.attn.q_norm.weight": Tensor(f"{ckpt}.q_norm.weight", (q_out,)),
        f"layers.{layer}.attn.k_norm.weight": Tensor(f"{ckpt}.k_norm.weight", (kv_out,)),
        **routed_experts(args, layer),
    }
