"""gpt-oss (openai/gpt-oss-20b, -120b): grouped-query attention with biases and a learned sink logit per head,
sliding windows (128) on every other layer, YaRN, and MoE layers whose router has a bias and mixes the top k
by a softmax over their logits alone; the experts carry biases and use a clamped SwiGLU.

No softmax over all experts exists in the model: RW here is that softmax of the biased logits, the
distribution the top-k weights are a renormalisation of (weights.md). The released experts are MXFP4
(blocks and scales, with gate and up interleaved row by row); they are dequantized as they are read.
transformers 5 holds them unquantized and transposed (`gate_up_proj [E, D, 2I]`, x @ W); both are read.
"""

from ..decoder.args import ModelArgs
from ..errors import ConfigError
from .config import ConfigReader
from .names import LAYER, Deinterleaved, Mxfp4, NameMap, Tensor, Transposed, attention, block_norms

MODEL_TYPE = "gpt_oss"
OFFICIAL_RW = None  # the authors' code predates this family: no official mode
LAYER_TYPES = ("sliding_attention", "full_attention")
MXFP4_BLOCK = 32  # values per scale


def args_from_config(cfg: ConfigReader) -> ModelArgs:
    num_experts = cfg.num_experts("num_local_experts")
    top_k = cfg.positive("num_experts_per_tok")
    cfg.check_top_k(top_k, num_experts)
    quantization = cfg.get("quantization_config", dict, None)
    if quantization is not None and quantization.get("quant_method") != "mxfp4":
        raise cfg.error("quantization_config", f"has quant_method {quantization.get('quant_method')!r}; only the released 'mxfp4' is read")
    if not cfg.get("attention_bias", bool, True):
        raise cfg.error("attention_bias", "is false; gpt-oss checkpoints have attention biases and this variant is not supported")
    num_layers = cfg.positive("num_hidden_layers")
    layer_types = cfg.get("layer_types", list, None)
    if layer_types is None:  # the released default: even layers slide
        layer_types = [LAYER_TYPES[i % 2] for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise cfg.error("layer_types", f"has {len(layer_types)} entries for {num_layers} layers; give one per layer")
    for i, kind in enumerate(layer_types):
        if kind not in LAYER_TYPES:
            raise cfg.error("layer_types", f"has {kind!r} at layer {i}; each entry must be one of {', '.join(LAYER_TYPES)}")
    window = cfg.positive("sliding_window")
    alpha, limit = cfg.get("swiglu_alpha", float, 1.702), cfg.get("swiglu_limit", float, 7.0)
    if alpha <= 0 or limit <= 0:
        raise cfg.error("swiglu_limit" if limit <= 0 else "swiglu_alpha", f"must be positive, got {limit if limit <= 0 else alpha}")
    theta, yarn = cfg.rope(yarn_allowed=True)
    shape = cfg.attention_shape()
    return ModelArgs(
        family=MODEL_TYPE,
        vocab_size=cfg.positive("vocab_size"),
        num_layers=num_layers,
        max_position_embeddings=cfg.positive("max_position_embeddings"),
        rope_theta=theta,
        yarn=yarn,
        rms_norm_eps=cfg.between("rms_norm_eps", 0, 1),
        num_experts=num_experts,
        top_k=top_k,
        expert_size=cfg.positive("intermediate_size"),  # gpt-oss's intermediate_size is the expert size
        norm_topk_prob=True,  # softmax over the top-k logits = the full softmax renormalised over them
        moe_layers=tuple(range(num_layers)),
        dense_size=0,
        qkv_bias=True,
        o_bias=True,
        attention_sinks=True,
        sliding_window=window,
        sliding_layers=tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention"),
        router_bias=True,
        expert_bias=True,
        clamped_swiglu=(alpha, limit),
        tie_word_embeddings=cfg.get("tie_word_embeddings", bool, False),
        **shape,
    )


def layer_names(args: ModelArgs, layer: int) -> NameMap:
    ckpt, ours = f"{LAYER.format(layer=layer)}.mlp", f"layers.{layer}.mlp"
    d, size, e = args.hidden_size, args.expert_size, args.num_experts
    names = {
        **block_norms(args, layer),
        **attention(args, layer),
        f"{ours}.router.weight": Tensor(f"{ckpt}.router.weight", (e, d)),
        f"{ours}.router.bias": Tensor(f"{ckpt}.router.bias", (e,)),
        # gate and up alternate along the 2I axis (of the bias too): reordered into our [gate; up].
        f"{ours}.experts.gate_up_bias": Deinterleaved(Tensor(f"{ckpt}.experts.gate_up_proj_bias", (e, 2 * size)), dim=1),
        f"{ours}.experts.down_bias": Tensor(f"{ckpt}.experts.down_proj_bias", (e, d)),
    }
    if args.mxfp4_experts:  # as released: [E, out, in / 32, 16] bytes and [E, out, in / 32] scales
        for width in (d, size):
            if width % MXFP4_BLOCK:
                raise ConfigError(f"gpt-oss MXFP4 experts need hidden_size and intermediate_size divisible by 32, got {width}")

        def mxfp4(name: str, rows: int, columns: int) -> Mxfp4:
            groups = columns // MXFP4_BLOCK
            return Mxfp4(Tensor(f"{ckpt}.experts.{name}_blocks", (e, rows, groups, 16)), Tensor(f"{ckpt}.experts.{name}_scales", (e, rows, groups)))

        names[f"{ours}.experts.gate_up"] = Deinterleaved(mxfp4("gate_up_proj", 2 * size, d), dim=1)
        names[f"{ours}.experts.down"] = mxfp4("down_proj", d, size)
    else:  # transformers 5's layout: x @ W with W [E, in, out]
        names[f"{ours}.experts.gate_up"] = Deinterleaved(Transposed(Tensor(f"{ckpt}.experts.gate_up_proj", (e, d, 2 * size))), dim=1)
        names[f"{ours}.experts.down"] = Transposed(Tensor(f"{ckpt}.experts.down_proj", (e, size, d)))
    return names


# A small random checkpoint for demos and tests (demo/checkpoints.py): alternating windows shorter than a
# PromptEOL sentence, YaRN, grouped-query attention (written in transformers 5's unquantized layout).
DEMO_CONFIG = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": MODEL_TYPE,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 32,
    "head_dim": 16,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "sliding_window": 8,
    "attention_bias": True,
    "swiglu_limit": 7.0,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05,
    "rope_theta": 150000,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
                     "beta_slow": 1.0, "truncate": False},
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "eos_token_id": 0,
    "pad_token_id": 1,
}
TOKENIZER_STYLE = {"bos": False, "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}
