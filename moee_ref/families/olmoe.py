"""OLMoE (allenai/OLMoE-1B-7B-0924): every layer is MoE; q/k RMSNorm; optional clip_qkv."""

from ..decoder.args import ModelArgs
from .config import ConfigReader
from .names import NameMap, attention, block_norms, routed_experts

MODEL_TYPE = "olmoe"
# The router output the authors' public code concatenates as RW for this family (official mode).
OFFICIAL_RW = "logits"


def args_from_config(cfg: ConfigReader) -> ModelArgs:
    num_experts = cfg.num_experts()
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
        qk_norm="projection",
        clip_qkv=clip_qkv,
        **common,
    )


def layer_names(args: ModelArgs, layer: int) -> NameMap:
    return {**block_norms(args, layer), **attention(args, layer), **routed_experts(args, layer)}


# A small random checkpoint of this family for demos and tests (demo/checkpoints.py), in the released
# config.json style, every feature of the family switched on.
DEMO_CONFIG = {
    "architectures": ["OlmoeForCausalLM"],
    "model_type": MODEL_TYPE,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "norm_topk_prob": False,
    "clip_qkv": None,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "eos_token_id": 0,  # ids of the demo tokenizer's special tokens
    "pad_token_id": 1,
}
# The special-token conventions of the released tokenizer, for the demo tokenizer (demo/tokenizers.py).
TOKENIZER_STYLE = {"bos": False, "eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}
