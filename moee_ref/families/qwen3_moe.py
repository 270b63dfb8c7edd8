"""Qwen3-MoE (Qwen/Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen1.5-MoE's layout without its shared expert and
q/k/v bias, with an RMSNorm on each query and key head (one weight shared by the heads, before RoPE) and a
head_dim that need not be hidden_size / heads. The router is softmax over all experts, then the top k,
renormalised where norm_topk_prob says so (true in the released configs)."""

from ..decoder.args import ModelArgs
from .config import ConfigReader
from .names import NameMap, attention, block_norms, dense_mlp, routed_experts

MODEL_TYPE = "qwen3_moe"
OFFICIAL_RW = None  # the authors' code predates this family: no official mode


def args_from_config(cfg: ConfigReader) -> ModelArgs:
    num_experts = cfg.num_experts()
    top_k = cfg.positive("num_experts_per_tok")
    cfg.check_top_k(top_k, num_experts)
    if cfg.get("attention_bias", bool, False):
        raise cfg.error("attention_bias", "is true; Qwen3-MoE checkpoints have no attention bias and it is not supported")
    common = cfg.common()
    moe_layers = cfg.sparse_step_layers(common["num_layers"])
    return ModelArgs(
        family=MODEL_TYPE,
        num_experts=num_experts,
        top_k=top_k,
        expert_size=cfg.positive("moe_intermediate_size"),
        moe_layers=moe_layers,
        dense_size=cfg.positive("intermediate_size") if len(moe_layers) < common["num_layers"] else 0,
        qk_norm="head",
        # transformers 5 slides every layer when use_sliding_window is on (the released configs have it off).
        **cfg.sliding_window(common["num_layers"]),
        **common,
    )


def layer_names(args: ModelArgs, layer: int) -> NameMap:
    names = {**block_norms(args, layer), **attention(args, layer)}
    if layer not in args.moe_layers:
        return {**names, **dense_mlp(args, layer)}
    return {**names, **routed_experts(args, layer)}


# A small random checkpoint for demos and tests (demo/checkpoints.py): head_dim apart from hidden/heads,
# grouped-query attention, a dense layer and renormalised top-k, as features of the family.
DEMO_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": MODEL_TYPE,
    "vocab_size": 512,
    "hidden_size": 64,
    "head_dim": 32,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [0],
    "norm_topk_prob": True,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
TOKENIZER_STYLE = {"bos": False, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
