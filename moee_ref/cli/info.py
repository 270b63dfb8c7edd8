"""Plain-text facts about a checkpoint and about one routing decision."""

from __future__ import annotations

from typing import Any

from ..decoder.args import ModelArgs


def human_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def model_facts(args: ModelArgs, tokenizer=None) -> dict[str, Any]:
    """What `moee info` reports, as a JSON-ready dict."""
    total, active = args.parameter_counts()
    facts: dict[str, Any] = {
        "family": args.family,
        "layers": args.num_layers,
        "moe_layers": list(args.moe_layers),
        "dense_layers": list(args.dense_layers),
        "experts": args.num_experts,
        "top_k": args.top_k,
        "expert_size": args.expert_size,
        "shared_expert_size": args.shared_expert_size,
        "shared_expert_gated": args.shared_expert_gated,
        "norm_topk_prob": args.norm_topk_prob,
        "hidden_size": args.hidden_size,
        "heads": args.num_heads,
        "kv_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "qk_norm": args.qk_norm,
        "sliding_window": args.sliding_window,
        "sliding_layers": list(args.sliding_layers),
        "latent_attention": vars(args.latent_attention) if args.latent_attention else None,
        "yarn": vars(args.yarn) if args.yarn else None,
        "expert_groups": [args.topk_group, args.num_groups] if args.num_groups > 1 else None,
        "routed_scaling_factor": args.routed_scaling_factor,
        "router_bias": args.router_bias,
        "expert_bias": args.expert_bias,
        "clamped_swiglu": list(args.clamped_swiglu) if args.clamped_swiglu else None,
        "attention_sinks": args.attention_sinks,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_position_embeddings,
        "parameters_total": total,
        "parameters_active": active,
        "memory_fp32_bytes": total * 4,
        "memory_bf16_bytes": total * 2,
        "hs_dim": args.hidden_size,
        "rw_dim": args.routing_dim,
    }
    if tokenizer is not None:
        facts["tokenizer"] = {
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
            "adds_bos": tokenizer.adds_bos,
            "adds_eos": tokenizer.adds_eos,
        }
    return facts


def _attention(facts: dict[str, Any]) -> str:
    parts = {"projection": ["q/k RMSNorm over the whole projection"], "head": ["q/k RMSNorm per head"]}.get(facts["qk_norm"], [])
    mla = facts["latent_attention"]
    if mla:
        queries = f"queries from a latent of {mla['q_lora_rank']}" if mla["q_lora_rank"] else "queries projected directly"
        parts.append(f"latent (MLA): keys and values from a latent of {mla['kv_lora_rank']}, {queries}, "
                     f"rotary part {mla['rope_dim']} of each {mla['nope_dim'] + mla['rope_dim']}-wide q/k head, values {mla['value_dim']}")
    if facts["attention_sinks"]:
        parts.append("biases on q, k, v, o and a learned sink logit per head")
    if facts["yarn"]:
        parts.append(f"YaRN x{facts['yarn']['factor']:g} from {facts['yarn']['original_max_position_embeddings']} positions")
    if facts["sliding_window"]:
        parts.append(f"sliding window of {facts['sliding_window']} in layers {_ranges(facts['sliding_layers'])}")
    return "; ".join(parts) or "plain causal"


def format_facts(facts: dict[str, Any]) -> str:
    moe = facts["moe_layers"]
    lines = [
        f"family              {facts['family']}",
        f"layers              {facts['layers']} ({len(moe)} MoE: {_ranges(moe)}"
        + (f"; dense: {_ranges(facts['dense_layers'])})" if facts["dense_layers"] else ")"),
        f"routed experts      {facts['experts']} of size {facts['expert_size']}, top-{facts['top_k']}"
        + (f" within the best {facts['expert_groups'][0]} of {facts['expert_groups'][1]} groups" if facts["expert_groups"] else "")
        + (", renormalised" if facts["norm_topk_prob"] else "")
        + (f", weights x{facts['routed_scaling_factor']:g}" if not facts["norm_topk_prob"] and facts["routed_scaling_factor"] != 1 else "")
        + ("; router bias" if facts["router_bias"] else "")
        + ("; experts with biases" if facts["expert_bias"] else "")
        + (f", SwiGLU clamped at {facts['clamped_swiglu'][1]:g} (alpha {facts['clamped_swiglu'][0]:g})" if facts["clamped_swiglu"] else ""),
        "shared experts      "
        + (
            f"one MLP of {facts['shared_expert_size']}" + (" behind a sigmoid gate" if facts["shared_expert_gated"] else ", ungated")
            if facts["shared_expert_size"]
            else "none"
        ),
        f"hidden size         {facts['hidden_size']} ({facts['heads']} heads of {facts['head_dim']}, {facts['kv_heads']} kv heads)",
        f"attention           {_attention(facts)}",
        f"parameters          {human_count(facts['parameters_total'])} total, {human_count(facts['parameters_active'])} active per token",
        f"memory              {human_bytes(facts['memory_fp32_bytes'])} at fp32, {human_bytes(facts['memory_bf16_bytes'])} at bf16",
        f"embedding dims      HS {facts['hs_dim']}, RW {facts['rw_dim']} ({len(moe)} MoE layers x {facts['experts']} experts)",
    ]
    compute = facts.get("compute")
    if compute:
        lines.append(f"compute dtype       {compute['auto_dtype']} by default here ({compute['reason']})")
    fit = facts.get("memory_fit")
    if fit:
        modes = ", ".join(f"{m['mode']} {human_bytes(m['need_bytes'])}{'' if m['fits'] else ' (does not fit)'}"
                          f"{' (slow here: no native bf16)' if m.get('slow') else ''}" for m in fit["modes"])
        lines.append(f"memory needed       {modes}; this process may use {human_bytes(fit['available_bytes'])} ({fit['source']})")
    int8 = facts.get("int8")
    if int8:
        lines.append(f"int8 matmuls        {int8['kernel']}")
        lines.append(f"int8 prepared cache {int8['cache']}: {int8['cache_state']}")
    tok = facts.get("tokenizer")
    if tok:
        lines.append(
            f"tokenizer           vocab {tok['vocab_size']}, bos {tok['bos_id']} ({'added' if tok['adds_bos'] else 'not added'}), "
            f"eos {tok['eos_id']}, pad {tok['pad_id']}"
        )
    return "\n".join(lines)


def _ranges(layers: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    if not layers:
        return "none"
    parts, start, prev = [], layers[0], layers[0]
    for layer in layers[1:] + [None]:
        if layer is not None and layer == prev + 1:
            prev = layer
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if layer is not None:
            start = prev = layer
    return ", ".join(parts)


def format_routing_table(table: list[dict[str, Any]]) -> str:
    lines = ["layer  entropy  top experts (mixing weight)"]
    for entry in table:
        choices = "  ".join(f"{e:>3}:{w:.3f}" for e, w in zip(entry["experts"], entry["weights"]))
        lines.append(f"{entry['layer']:>5}  {entry['entropy']:7.3f}  {choices}")
    return "\n".join(lines)


def int8_facts(directory, args, dtype, cache_dir=None) -> dict[str, Any]:
    """For `moee info`: which int8 matmuls run here in `dtype`, and whether a resident int8 load would read its
    prepared weights from the cache (loading/prepared.py) or build them."""
    from ..kernels.int8 import integer_reason
    from ..loading.prepared import PreparedCache

    cache = PreparedCache(cache_dir, directory, dtype, args.num_layers)
    usable, why = cache.check()
    return {"kernel": integer_reason(dtype), "cache": str(cache.path), "cache_usable": usable,
            "cache_state": "present, an int8 load reads it" if usable else f"an int8 load builds it ({why})"}
