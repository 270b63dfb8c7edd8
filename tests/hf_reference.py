"""Small random checkpoints written by transformers, and the transformers models to compare against.

OLMoE, Qwen1.5-MoE, Qwen3-MoE and Mixtral: transformers' own classes saved
with save_pretrained in several shards (or as their fused state dict). DeepSeekMoE has no transformers class; as
families/deepseek.py describes, a Qwen2-MoE model computes exactly the same
function when the dense layers are mlp_only_layers, q/k/v biases are zero,
the shared expert is n_shared x moe_intermediate_size wide with a gate of
all zeros (sigmoid(0) = 0.5) and a down projection doubled (exact in
floating point). The checkpoint is then written in DeepSeek's own tensor
names with DeepSeek's config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

transformers = __import__("pytest").importorskip("transformers")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Replace the default init by weights that make every part matter (norms, biases, routers)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                base = 0.0 if name.endswith("bias") else 1.0
                param.copy_(base + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param.shape[-1]
                scale = 1.5 if name.endswith("mlp.gate.weight") else 1.0
                param.copy_(scale * torch.randn(param.shape, generator=generator) / fan_in**0.5)


# Small configs of each family transformers has: (config class, model class, its values; overrides go on top).
HF_MODELS = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        vocab_size=300, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
        pad_token_id=None, eos_token_id=None, bos_token_id=None, experts_implementation="eager",
    )),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=64, experts_implementation="eager",
    )),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=300, hidden_size=64, head_dim=24, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=True, max_position_embeddings=64, experts_implementation="eager",
    )),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=300, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
        experts_implementation="eager",
    )),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
        max_position_embeddings=64, experts_implementation="eager",
    )),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        vocab_size=300, hidden_size=64, intermediate_size=32, head_dim=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, sliding_window=4, max_position_embeddings=64,
        experts_implementation="eager",
    )),
}


def hf_config(family: str, **overrides):
    config_class, _, values = HF_MODELS[family]
    return getattr(transformers, config_class)(**{**values, **overrides})


def mxfp4_bytes(shape: tuple[int, ...], generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks [..., G, 16] and scales [..., G] (exponents 2^-7 to 2^-3: weights of a sensible size)."""
    blocks = torch.randint(0, 256, shape, generator=generator, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(120, 125, shape[:-1], generator=generator, dtype=torch.int32).to(torch.uint8)
    return blocks, scales


def quantize_gpt_oss_experts(model, seed: int) -> dict[str, torch.Tensor]:
    """Give every expert matrix of a transformers gpt-oss model MXFP4 values (dequantized by transformers' own
    function) and return the released tensors that hold them: {name_blocks, name_scales}."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(seed)
    stored = {}
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(experts, name)  # [E, in, out]: transformers' x @ W
            e, columns, rows = param.shape
            blocks, scales = mxfp4_bytes((e, rows, columns // 32, 16), generator)
            with torch.no_grad():
                param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
            stored[f"model.layers.{i}.mlp.experts.{name}_blocks"] = blocks
            stored[f"model.layers.{i}.mlp.experts.{name}_scales"] = scales
    return stored


def build_hf(family: str, directory: Path, seed: int = 0, shard_size: str = "60KB", fused: bool = False, mxfp4: bool = False,
             **overrides):
    """(transformers model in eval mode, checkpoint directory) for a family transformers has.

    save_pretrained writes the released layout (one tensor per expert, Mixtral's block_sparse_moe names).
    fused=True writes transformers 5's in-memory state dict instead: [E, 2I, D] gate_up_proj and
    [E, D, I] down_proj per layer, under mlp.experts, the fused layout some tools save.
    """
    model = getattr(transformers, HF_MODELS[family][1])(hf_config(family, **overrides))
    randomize(model, seed)
    if mxfp4:  # gpt-oss as released: experts as MXFP4 blocks and scales, the rest as saved
        released = quantize_gpt_oss_experts(model, seed)
        state = {n: t.detach().clone().contiguous() for n, t in model.state_dict().items() if not n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
        directory.mkdir(parents=True)
        save_file({**state, **released}, str(directory / "model.safetensors"), metadata={"format": "pt"})
        config = {**model.config.to_dict(), "quantization_config": {"quant_method": "mxfp4"}}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        return model.eval(), directory
    model.save_pretrained(directory, max_shard_size=shard_size)
    if fused:
        for file in directory.glob("model*.safetensors*"):
            file.unlink()
        state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
        assert any(name.endswith("experts.gate_up_proj") for name in state)
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return model.eval(), directory


DEEPSEEK_SMALL = dict(
    vocab_size=300, hidden_size=64, intermediate_size=120, moe_intermediate_size=24, n_routed_experts=8,
    n_shared_experts=2, num_experts_per_tok=3, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    first_k_dense_replace=1, moe_layer_freq=1, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000,
    norm_topk_prob=False,
)


def deepseek_moe_layers(cfg: dict) -> list[int]:
    return [i for i in range(cfg["num_hidden_layers"]) if i >= cfg["first_k_dense_replace"] and i % cfg["moe_layer_freq"] == 0]


def build_deepseek(directory: Path, seed: int = 0, shards: int = 3, **overrides):
    """(exact Qwen2-MoE reference model, DeepSeekMoE checkpoint directory)."""
    cfg = {**DEEPSEEK_SMALL, **overrides}
    moe_layers = deepseek_moe_layers(cfg)
    reference = transformers.Qwen2MoeForCausalLM(
        hf_config(
            "qwen2_moe",
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            moe_intermediate_size=cfg["moe_intermediate_size"],
            shared_expert_intermediate_size=cfg["n_shared_experts"] * cfg["moe_intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_key_value_heads"], num_experts=cfg["n_routed_experts"],
            num_experts_per_tok=cfg["num_experts_per_tok"], norm_topk_prob=cfg["norm_topk_prob"],
            decoder_sparse_step=1, mlp_only_layers=[i for i in range(cfg["num_hidden_layers"]) if i not in moe_layers],
            max_position_embeddings=cfg["max_position_embeddings"], rms_norm_eps=cfg["rms_norm_eps"],
            rope_parameters={"rope_type": "default", "rope_theta": float(cfg["rope_theta"])},
        )
    )
    randomize(reference, seed)
    state = {}
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                param.zero_()
                continue  # DeepSeekMoE has no attention bias
            if name.endswith("shared_expert_gate.weight"):
                param.zero_()  # sigmoid(0) = 0.5 exactly ...
                continue
            if name.endswith("mlp.experts.gate_up_proj"):  # transformers keeps experts fused; checkpoints do not
                prefix = name[: -len("gate_up_proj")]
                for expert, fused in enumerate(param):
                    gate, up = fused.chunk(2, dim=0)
                    state[f"{prefix}{expert}.gate_proj.weight"] = gate.clone().contiguous()
                    state[f"{prefix}{expert}.up_proj.weight"] = up.clone().contiguous()
                continue
            if name.endswith("mlp.experts.down_proj"):
                prefix = name[: -len("down_proj")]
                for expert, down in enumerate(param):
                    state[f"{prefix}{expert}.down_proj.weight"] = down.clone().contiguous()
                continue
            deepseek_name = name.replace("mlp.shared_expert.", "mlp.shared_experts.")
            state[deepseek_name] = param.detach().clone().contiguous()
            if name.endswith("shared_expert.down_proj.weight"):
                param.mul_(2.0)  # ... and 0.5 * (2 W) = W, exactly
    directory.mkdir(parents=True)
    names = sorted(state)
    weight_map = {}
    for part in range(shards):
        chunk = {n: state[n] for n in names[part::shards]}
        file = f"model-{part + 1:05d}-of-{shards:05d}.safetensors"
        save_file(chunk, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "hidden_act": "silu",
        "scoring_func": "softmax", "attention_bias": False, "pretraining_tp": 1, "rope_scaling": None,
        "tie_word_embeddings": False, "auto_map": {"AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
        **cfg,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return reference.eval(), directory


def left_padded_batch(vocab_size: int, lengths: list[int], seed: int = 0, pad_id: int = 0, side: str = "left"):
    """Random token ids with unequal lengths, padded on one side; returns (input_ids, attention_mask)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = torch.randint(0, vocab_size, (n,), generator=generator)
        mask[row, cols] = 1
    return ids, mask


def run_reference(model, input_ids, attention_mask, with_choices: bool = False):
    """transformers forward with positions counted over real tokens (as moee-ref does).

    with_choices: also the experts each router module chose and their weights ([B, L_moe, T, k] each),
    read from the router modules' outputs (transformers returns only the logits).
    """
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    routers = [getattr(layer.mlp, "gate", None) or layer.mlp.router for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    chosen = []
    handles = [router.register_forward_hook(lambda module, args, out: chosen.append(out)) for router in routers]
    try:
        with torch.no_grad():
            out = model.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                output_router_logits=True, use_cache=False,
            )
            hidden = out.last_hidden_state  # after the final norm
            logits = model.lm_head(hidden)
    finally:
        for handle in handles:
            handle.remove()
    batch, length = input_ids.shape
    router_logits = torch.stack([r.reshape(batch, length, -1) for r in out.router_logits], dim=1)
    if not with_choices:
        return logits, hidden, router_logits
    weights = torch.stack([w.reshape(batch, length, -1) for _, w, _ in chosen], dim=1)
    ids = torch.stack([i.reshape(batch, length, -1) for _, _, i in chosen], dim=1)
    return logits, hidden, router_logits, ids, weights


def exact_float64_norms(monkeypatch) -> None:
    """Make transformers' RMSNorm compute in float64 for a float64 model.

    transformers' RMSNorm always casts to float32 (right for bf16 models), so
    its "float64" forward carries float32 rounding at every norm, around 1e-6
    relative after a few layers. For the float64 comparison both sides must
    do the same math in float64; this lifts that one cast and nothing else.
    """

    def forward(self, hidden_states):
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        x = hidden_states.to(dtype)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(hidden_states.dtype)

    from transformers.models.deepseek_v2 import modeling_deepseek_v2
    from transformers.models.gpt_oss import modeling_gpt_oss
    from transformers.models.mixtral import modeling_mixtral
    from transformers.models.olmoe import modeling_olmoe
    from transformers.models.qwen2_moe import modeling_qwen2_moe
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    monkeypatch.setattr(modeling_olmoe.OlmoeRMSNorm, "forward", forward)
    monkeypatch.setattr(modeling_qwen2_moe.Qwen2MoeRMSNorm, "forward", forward)
    monkeypatch.setattr(modeling_qwen3_moe.Qwen3MoeRMSNorm, "forward", forward)
    monkeypatch.setattr(modeling_mixtral.MixtralRMSNorm, "forward", forward)
    monkeypatch.setattr(modeling_deepseek_v2.DeepseekV2RMSNorm, "forward", forward)
    monkeypatch.setattr(modeling_gpt_oss.GptOssRMSNorm, "forward", forward)
