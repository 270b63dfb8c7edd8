"""DeepSeekMoE (deepseek-ai/deepseek-moe-16b-base): LLaMA attention, dense first layers,
n_shared_experts fused into one ungated MLP beside the routed experts.

Upstream this model ships remote code; none of it is used: config.json is
read as data and the math is written here.
"""

import torch

from ..decoder.args import ModelArgs
from .config import ConfigReader
from .names import LAYER, NameMap, attention, block_norms, dense_mlp, routed_experts, swiglu

MODEL_TYPE = "deepseek"
OFFICIAL_RW = "probs"  # the router output the authors' code concatenates as RW (official mode)


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
    moe_layers = cfg.dense_first_layers(common["num_layers"])
    expert_size = cfg.positive("moe_intermediate_size")
    n_shared = cfg.non_negative("n_shared_experts")
    return ModelArgs(
        family=MODEL_TYPE,
        num_experts=num_experts,
        top_k=top_k,
        expert_size=expert_size,
        moe_layers=moe_layers,
        dense_size=cfg.positive("intermediate_size") if len(moe_layers) < common["num_layers"] else 0,
        # The shared experts are stored fused as one MLP n_shared times as wide.
        shared_expert_size=n_shared * expert_size,
        **common,
    )


def layer_names(args: ModelArgs, layer: int) -> NameMap:
    return {**block_norms(args, layer), **attention(args, layer), **mlp_names(args, layer)}


def mlp_names(args: ModelArgs, layer: int) -> NameMap:
    """A layer's MLP as DeepSeek names it (DeepSeekMoE and DeepSeek-V2): dense, or routed plus shared experts."""
    if layer not in args.moe_layers:
        return dense_mlp(args, layer)
    names = routed_experts(args, layer)
    if args.shared_expert_size:
        ckpt = f"{LAYER.format(layer=layer)}.mlp.shared_experts"
        names.update(swiglu(ckpt, f"layers.{layer}.mlp.shared", args.hidden_size, args.shared_expert_size))
    return names


def transformers_reference(transformers, args: ModelArgs, read):
    """transformers' model of a DeepSeekMoE checkpoint, for `moee verify` and the parity tests.

    transformers has no DeepSeekMoE (v1) class, and the hub's remote code is
    never run, so the checkpoint is loaded into Qwen2MoE, which computes the
    same function once its extras are neutralised: zero q/k/v biases, and a
    shared-expert gate of sigmoid(0) = 1/2 against a doubled down matrix
    (exact in binary floating point). read(name): a checkpoint tensor in float32.
    """
    config = transformers.Qwen2MoeConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.dense_size or 1,
        moe_intermediate_size=args.expert_size, shared_expert_intermediate_size=args.shared_expert_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
        num_experts=args.num_experts, num_experts_per_tok=args.top_k, norm_topk_prob=args.norm_topk_prob,
        decoder_sparse_step=1, mlp_only_layers=list(args.dense_layers), max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=args.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=args.tie_word_embeddings,
    )
    with torch.device("meta"):
        model = transformers.Qwen2MoeForCausalLM(config)
    state = {}
    for name, param in model.named_parameters():
        if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "shared_expert_gate.weight")):
            state[name] = torch.zeros(param.shape)
        elif name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")) and args.fused_experts:
            state[name] = read(name)  # stored fused, as transformers holds them
        elif name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            state[name] = torch.stack(
                [torch.cat([read(f"{prefix}{e}.gate_proj.weight"), read(f"{prefix}{e}.up_proj.weight")]) for e in range(args.num_experts)]
            )
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            state[name] = torch.stack([read(f"{prefix}{e}.down_proj.weight") for e in range(args.num_experts)])
        elif ".mlp.shared_expert." in name:
            tensor = read(name.replace(".mlp.shared_expert.", ".mlp.shared_experts."))
            state[name] = 2.0 * tensor if name.endswith("down_proj.weight") else tensor  # 0.5 * (2 W) = W exactly
        else:
            state[name] = read(name)
    model.load_state_dict(state, assign=True, strict=True)
    # Buffers that are not in any checkpoint (rotary frequencies) must be built for real, off the meta device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


# A small random checkpoint for demos and tests (demo/checkpoints.py): a dense first layer and two shared experts.
DEMO_CONFIG = {
    "architectures": ["DeepseekForCausalLM"],
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
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "rope_scaling": None,
    "attention_bias": False,
    "pretraining_tp": 1,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 0,
}
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
TOKENIZER_STYLE = {
    "bos": BOS,
    "add_bos_token": True,
    "eos_token": EOS,
    "pad_token": EOS,
    # DeepSeek's hub config writes its tokens as AddedToken dicts; loaders must read both forms.
    "tokens_as_dicts": True,
}
