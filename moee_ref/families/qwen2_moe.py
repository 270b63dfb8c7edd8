"""Qwen1.5-MoE (Qwen/Qwen1.5-MoE-A2.7B): q/k/v bias, a shared expert scaled by a sigmoid gate,
MoE layers chosen by decoder_sparse_step and mlp_only_layers."""

from ..decoder.args import ModelArgs
from .config import ConfigReader
from .names import LAYER, NameMap, Tensor, attention, block_norms, dense_mlp, routed_experts, swiglu

MODEL_TYPE = "qwen2_moe"
OFFICIAL_RW = "logits"  # the router output the authors' code concatenates as RW (official mode)


def args_from_config(cfg: ConfigReader) -> ModelArgs:
    num_experts = cfg.num_experts()
    top_k = cfg.positive("num_experts_per_tok")
    cfg.check_top_k(top_k, num_experts)
    if cfg.get("use_sliding_window", bool, False):
        raise cfg.error("use_sliding_window", "is true; sliding-window attention is not supported (the released model has it off)")
    common = cfg.common()
    moe_layers = cfg.sparse_step_layers(common["num_layers"])
    shared_size = cfg.non_negative("shared_expert_intermediate_size")
    return ModelArgs(
        family=MODEL_TYPE,
        num_experts=num_experts,
        top_k=top_k,
        expert_size=cfg.positive("moe_intermediate_size"),
        moe_layers=moe_layers,
        # intermediate_size is always present in the released configs, even where no layer is dense.
        dense_size=cfg.positive("intermediate_size") if len(moe_layers) < common["num_layers"] else 0,
        shared_expert_size=shared_size,
        shared_expert_gated=shared_size > 0,  # the gate scales the shared expert; without one there is none
        # Older configs (the released one) have no qkv_bias field: the bias is always there.
        qkv_bias=cfg.get("qkv_bias", bool, True),
        **common,
    )


def layer_names(args: ModelArgs, layer: int) -> NameMap:
    names = {**block_norms(args, layer), **attention(args, layer)}
    if layer not in args.moe_layers:
        return {**names, **dense_mlp(args, layer)}
    names.update(routed_experts(args, layer))
    if args.shared_expert_size:
        ckpt, ours = f"{LAYER.format(layer=layer)}.mlp", f"layers.{layer}.mlp"
        names.update(swiglu(f"{ckpt}.shared_expert", f"{ours}.shared", args.hidden_size, args.shared_expert_size))
        names[f"{ours}.shared_gate.weight"] = Tensor(f"{ckpt}.shared_expert_gate.weight", (1, args.hidden_size))
    return names


# A small random checkpoint for demos and tests (demo/checkpoints.py): a dense layer is left out here, as in
# the released model, and the shared expert with its gate is on.
DEMO_CONFIG = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": MODEL_TYPE,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_experts": 15,
    "num_experts_per_tok": 4,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": False,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "use_sliding_window": False,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
TOKENIZER_STYLE = {"bos": False, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
