"""Mixtral (mistralai/Mixtral-8x7B-v0.1, -8x22B; GritLM/GritLM-8x7B): LLaMA attention, every layer MoE,
top-2 of 8 experts always renormalised, sliding-window attention where the config gives a window.

The router takes the softmax over all experts, then the top k renormalised to sum to one: the same
weights as a softmax over the top-k logits alone, so RW (the full softmax) is the distribution Mixtral's
mixing weights are a renormalisation of. Released checkpoints name the MoE `block_sparse_moe` with experts
`w1` (gate), `w3` (up) and `w2` (down); transformers 5's fused layout names it `mlp`.
"""

from ..decoder.args import ModelArgs
from .config import ConfigReader
from .names import NameMap, attention, block_norms, routed_experts

MODEL_TYPE = "mixtral"
OFFICIAL_RW = None  # the authors' code loads GritLM-8x7B for a comparison, not as an MoEE model: no official mode
EXPERT_PROJECTIONS = ("w1", "w3", "w2")  # gate, up, down


def args_from_config(cfg: ConfigReader) -> ModelArgs:
    num_experts = cfg.num_experts("num_local_experts")
    top_k = cfg.positive("num_experts_per_tok")
    cfg.check_top_k(top_k, num_experts)
    common = cfg.common()
    common["norm_topk_prob"] = True  # Mixtral always renormalises; its config has no such field
    return ModelArgs(
        family=MODEL_TYPE,
        num_experts=num_experts,
        top_k=top_k,
        expert_size=cfg.positive("intermediate_size"),  # Mixtral's intermediate_size is the expert size
        moe_layers=tuple(range(common["num_layers"])),
        dense_size=0,
        **cfg.sliding_window(common["num_layers"], switch=None),
        **common,
    )


def layer_names(args: ModelArgs, layer: int) -> NameMap:
    if args.fused_experts:
        experts = routed_experts(args, layer)
    else:
        experts = routed_experts(args, layer, module="block_sparse_moe", projections=EXPERT_PROJECTIONS)
    return {**block_norms(args, layer), **attention(args, layer), **experts}


# A small random checkpoint for demos and tests (demo/checkpoints.py): grouped-query attention and a
# sliding window shorter than a PromptEOL sentence, so that the demo goes through the windowed masks.
DEMO_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": MODEL_TYPE,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 48,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": 16,
    "router_jitter_noise": 0.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,  # ids of the demo tokenizer's special tokens
    "eos_token_id": 0,
}
# Mixtral's tokenizer adds <s> and defines no pad token (a loader pads with eos).
TOKENIZER_STYLE = {"bos": "<s>", "add_bos_token": True, "eos_token": "</s>", "pad_token": None}
