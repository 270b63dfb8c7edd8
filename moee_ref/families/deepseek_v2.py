"""DeepSeek-V2 and V2-Lite (deepseek-ai/DeepSeek-V2-Lite, the 16B successor of DeepSeekMoE-16B; DeepSeek-V2):
multi-head latent attention with YaRN, dense first layers, shared experts, and a router whose top-k weights
are either renormalised or multiplied by routed_scaling_factor, chosen greedily or among the best expert groups.

The router is softmax over all experts in float32, so RW (the full softmax) is what its weights are read from.
This file follows config.json where transformers does not: transformers ignores norm_topk_prob and
moe_layer_freq, which DeepSeek's released code honours (renormalise instead of scaling; MoE only on
layers i >= first_k_dense_replace with i % moe_layer_freq == 0). Upstream this model ships remote code;
none of it is used.
"""

from ..decoder.args import LatentAttentionArgs, ModelArgs
from .config import ConfigReader
from .deepseek import BOS, EOS, mlp_names
from .names import LAYER, NameMap, Tensor, block_norms

MODEL_TYPE = "deepseek_v2"
OFFICIAL_RW = None  # the authors' code predates this family: no official mode
TOPK_METHODS = ("greedy", "group_limited_greedy")


def args_from_config(cfg: ConfigReader) -> ModelArgs:
    num_experts = cfg.positive("n_routed_experts")
    top_k = cfg.positive("num_experts_per_tok")
    cfg.check_top_k(top_k, num_experts)
    scoring = cfg.get("scoring_func", str, "softmax")
    if scoring != "softmax":
        raise cfg.error("scoring_func", f"is {scoring!r}; only 'softmax' routing is supported (DeepSeek-V3's sigmoid is not)")
    method = cfg.get("topk_method", str, "greedy")
    if method not in TOPK_METHODS:
        raise cfg.error("topk_method", f"is {method!r}; supported: {', '.join(TOPK_METHODS)}")
    num_groups, topk_group = (cfg.positive("n_group"), cfg.positive("topk_group")) if method != "greedy" else (1, 1)
    if num_experts % num_groups:
        raise cfg.error("n_group", f"({num_groups}) must divide n_routed_experts ({num_experts})")
    if topk_group > num_groups or top_k > topk_group * (num_experts // num_groups):
        raise cfg.error("topk_group", f"({topk_group} of {num_groups} groups) leaves fewer than num_experts_per_tok ({top_k}) experts to choose from")
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field, bool, False):
            raise cfg.error(field, "is true; DeepSeek-V2 checkpoints have no such bias and it is not supported")
    if cfg.get("hidden_act", str, "silu") != "silu":
        raise cfg.error("hidden_act", f"is {cfg.raw['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    heads = cfg.positive("num_attention_heads")
    mla = LatentAttentionArgs(
        kv_lora_rank=cfg.positive("kv_lora_rank"), q_lora_rank=cfg.get("q_lora_rank", int, 0),
        nope_dim=cfg.positive("qk_nope_head_dim"), rope_dim=cfg.positive("qk_rope_head_dim"), value_dim=cfg.positive("v_head_dim"),
    )
    if mla.q_lora_rank < 0:
        raise cfg.error("q_lora_rank", f"must be positive or null, got {mla.q_lora_rank}")
    if mla.rope_dim % 2:
        raise cfg.error("qk_rope_head_dim", f"must be even for rotary embeddings, got {mla.rope_dim}")
    head_dim = mla.nope_dim + mla.rope_dim  # config.json's head_dim is not read: transformers 5 saves the rotary part there
    theta, yarn = cfg.rope(yarn_allowed=True)
    # The softmax scale: 1/sqrt(q/k head), times YaRN's magnitude correction squared where mscale_all_dim is set.
    scale = head_dim**-0.5 * (yarn.magnitude(yarn.mscale_all_dim) ** 2 if yarn and yarn.mscale_all_dim else 1.0)

    num_layers = cfg.positive("num_hidden_layers")
    moe_layers = cfg.dense_first_layers(num_layers)
    expert_size = cfg.positive("moe_intermediate_size")
    n_shared = cfg.non_negative("n_shared_experts")
    scaling = cfg.get("routed_scaling_factor", float, 1.0)
    if scaling <= 0:
        raise cfg.error("routed_scaling_factor", f"must be positive, got {scaling}")
    return ModelArgs(
        family=MODEL_TYPE,
        vocab_size=cfg.positive("vocab_size"),
        hidden_size=cfg.positive("hidden_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=heads,  # every head has its own keys, expanded from the shared latent
        head_dim=head_dim,
        max_position_embeddings=cfg.positive("max_position_embeddings"),
        rope_theta=theta,
        rms_norm_eps=cfg.between("rms_norm_eps", 0, 1),
        num_experts=num_experts,
        top_k=top_k,
        expert_size=expert_size,
        norm_topk_prob=cfg.get("norm_topk_prob", bool, False),
        moe_layers=moe_layers,
        dense_size=cfg.positive("intermediate_size") if len(moe_layers) < num_layers else 0,
        shared_expert_size=n_shared * expert_size,  # the shared experts are stored fused as one MLP
        tie_word_embeddings=cfg.get("tie_word_embeddings", bool, False),
        latent_attention=mla,
        yarn=yarn,
        attention_scale=scale,
        num_groups=num_groups,
        topk_group=topk_group,
        routed_scaling_factor=scaling,
    )


def layer_names(args: ModelArgs, layer: int) -> NameMap:
    return {**block_norms(args, layer), **latent_attention(args, layer), **mlp_names(args, layer)}


def latent_attention(args: ModelArgs, layer: int) -> NameMap:
    ckpt, ours = f"{LAYER.format(layer=layer)}.self_attn", f"layers.{layer}.attn"
    mla, d, heads = args.latent_attention, args.hidden_size, args.num_heads
    q_out = heads * (mla.nope_dim + mla.rope_dim)
    if mla.q_lora_rank:
        names = {
            f"{ours}.q_a_proj.weight": Tensor(f"{ckpt}.q_a_proj.weight", (mla.q_lora_rank, d)),
            f"{ours}.q_a_norm.weight": Tensor(f"{ckpt}.q_a_layernorm.weight", (mla.q_lora_rank,)),
            f"{ours}.q_b_proj.weight": Tensor(f"{ckpt}.q_b_proj.weight", (q_out, mla.q_lora_rank)),
        }
    else:
        names = {f"{ours}.q_proj.weight": Tensor(f"{ckpt}.q_proj.weight", (q_out, d))}
    return {
        **names,
        f"{ours}.kv_a_proj.weight": Tensor(f"{ckpt}.kv_a_proj_with_mqa.weight", (mla.kv_lora_rank + mla.rope_dim, d)),
        f"{ours}.kv_a_norm.weight": Tensor(f"{ckpt}.kv_a_layernorm.weight", (mla.kv_lora_rank,)),
        f"{ours}.kv_b_proj.weight": Tensor(f"{ckpt}.kv_b_proj.weight", (heads * (mla.nope_dim + mla.value_dim), mla.kv_lora_rank)),
        f"{ours}.o_proj.weight": Tensor(f"{ckpt}.o_proj.weight", (d, heads * mla.value_dim)),
    }


# A small random checkpoint for demos and tests (demo/checkpoints.py), every feature on: query latent,
# YaRN, group-limited routing with a scaling factor, a dense first layer and shared experts.
DEMO_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": MODEL_TYPE,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 160,
    "moe_intermediate_size": 32,
    "n_routed_experts": 16,
    "n_shared_experts": 2,
    "num_experts_per_tok": 3,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "norm_topk_prob": False,
    "routed_scaling_factor": 2.0,
    "topk_method": "group_limited_greedy",
    "n_group": 4,
    "topk_group": 2,
    "scoring_func": "softmax",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 512, "beta_fast": 32, "beta_slow": 1,
                     "mscale": 0.707, "mscale_all_dim": 0.707},
    "attention_bias": False,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 0,
}
TOKENIZER_STYLE = {"bos": BOS, "add_bos_token": True, "eos_token": EOS, "pad_token": EOS, "tokens_as_dicts": True}
