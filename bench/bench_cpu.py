#!/usr/bin/env python
"""CPU benchmark: moee-ref against transformers on a random checkpoint with a real family's dimensions.

Run by hand, not in CI (bench/README.md):

    python bench/bench_cpu.py --family olmoe --layers 2 --reps 5

Builds once, under --workdir, a bf16 random checkpoint with the family's real
hidden, expert and vocabulary sizes and --layers decoder layers. Then, in one
process, interleaved, on the same weights and the same PromptEOL texts, it
times moee-ref's HS + RW features and transformers' model with router logits
(fp32, inference mode, same thread count), beside the machine's fp32 matmul
rate and memory read bandwidth measured in the same run. Load time and peak
RSS come from separate child processes, one model each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import moee_ref  # noqa: F401  first, before torch: its OpenMP wait setting applies (moee_ref/threads_wait.py)
import numpy as np
import torch

from moee_ref import MoEEmbedder, Tokenizer, read_config
from moee_ref.families import parse_config
from moee_ref.embedding.embedder import FeatureOptions, shared_prefix_ids
from moee_ref.embedding.prompts import apply_prompt, resolve_prompt
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs"
HF_CLASSES = {
    "olmoe": "OlmoeModel", "qwen2_moe": "Qwen2MoeModel", "deepseek": None,  # None: verify.py's equivalent
    "qwen3_moe": "Qwen3MoeModel", "mixtral": "MixtralModel", "deepseek_v2": "DeepseekV2Model", "gpt_oss": "GptOssModel",
}
OPTIONS = FeatureOptions(prompt="prompteol")
MIN_TOKENS, MAX_TOKENS = 20, 60
NUM_B1_TEXTS = 8
PARITY_TOL = 1e-4
SKIP_CAVEAT = 0.10  # above this share of skipped FLOPs, the batch-32 verdicts say little about a full model
TARGETS = {"b32_speedup": 2.0, "b32_matmul_share": 0.55, "b1_floor": 1.25, "rss": 1.15, "load": 0.5}
WORDS = (
    "the a small large old new red green quiet busy city river mountain garden house road train car bird dog "
    "cat child teacher doctor farmer engineer writer musician walks runs builds reads writes sings opens closes "
    "finds carries watches bright dark early late slowly quickly today yesterday tomorrow under over near behind "
    "through across market school library station bridge window letter story song price weather morning evening"
).split()


# ---------------------------------------------------------------- checkpoint and texts


def family_config(family: str, layers: int) -> dict:
    """The released config.json of the family with `layers` layers and the synthetic tokenizer's special ids."""
    config = json.loads((CONFIGS / f"{family}.json").read_text())
    config["num_hidden_layers"] = layers
    config.pop("quantization_config", None)  # the random checkpoint is written unquantized (gpt-oss's MXFP4 is not)
    if "layer_types" in config:  # gpt-oss: one entry per layer
        config["layer_types"] = config["layer_types"][:layers]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config.pop(key, None)
        if key in SMALL_CONFIGS[family]:
            config[key] = SMALL_CONFIGS[family][key]
    return config


def ensure_checkpoint(workdir: Path, family: str, layers: int) -> Path:
    directory = workdir / f"{family}-{layers}layers-bf16"
    if not directory.exists():
        print(f"building {directory} (once; bf16 as released) ...", flush=True)
        start = time.perf_counter()
        write_random_checkpoint(directory, family_config(family, layers), dtype="bfloat16", seed=0, max_shard_bytes=1 << 30)
        print(f"  built in {time.perf_counter() - start:.0f} s", flush=True)
    return directory


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def with_tokenizer(directory: Path, tokenizer_dir: Path) -> Path:
    """A sibling of the checkpoint directory with the same weights (symbolic links) and the tokenizer files of
    tokenizer_dir, e.g. a real model's, whose ids must fit the model's vocabulary."""
    tokenizer_dir = tokenizer_dir.expanduser().resolve()
    if not (tokenizer_dir / "tokenizer.json").is_file():
        sys.exit(f"--tokenizer {tokenizer_dir}: no tokenizer.json there; pass a directory with a model's tokenizer files")
    vocab = Tokenizer.from_dir(tokenizer_dir).vocab_size
    if vocab > read_config(directory).vocab_size:
        sys.exit(f"--tokenizer {tokenizer_dir}: {vocab} tokens, more than the model's vocabulary of {read_config(directory).vocab_size}")
    target = directory.with_name(f"{directory.name}-tokenizer-{tokenizer_dir.name}")
    target.mkdir(exist_ok=True)
    for file in directory.iterdir():
        link = target / file.name
        if file.name not in TOKENIZER_FILES and not link.exists():
            link.symlink_to(file.resolve())
    for name in TOKENIZER_FILES:
        (target / name).unlink(missing_ok=True)
        if (tokenizer_dir / name).is_file():
            (target / name).write_bytes((tokenizer_dir / name).read_bytes())
    return target


def token_count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.tokenize([apply_prompt(resolve_prompt(OPTIONS.prompt), text)])[0][0])


def make_texts(tokenizer: Tokenizer, count: int, seed: int = 0) -> list[str]:
    """Deterministic sentences whose PromptEOL prompts take MIN_TOKENS..MAX_TOKENS tokens (target length drawn uniformly)."""
    rng = random.Random(seed)
    texts = []
    while len(texts) < count:
        target = rng.randint(MIN_TOKENS, MAX_TOKENS)
        words = [rng.choice(WORDS).capitalize()]
        while token_count(tokenizer, " ".join(words) + ".") < target:
            words.append(rng.choice(WORDS))
        sentence = " ".join(words) + "."
        if MIN_TOKENS <= token_count(tokenizer, sentence) <= MAX_TOKENS:
            texts.append(sentence)
    assert all(MIN_TOKENS <= token_count(tokenizer, t) <= MAX_TOKENS for t in texts)
    return texts


# ---------------------------------------------------------------- the two sides


def load_ours(directory: Path) -> MoEEmbedder:
    """The float32 path (no LM head, matrices packed for oneDNN where torch has it); bench_precision.py times
    the default dtype="auto" (bf16 where native) and int8 beside it and beside transformers in bf16."""
    return MoEEmbedder.from_pretrained(directory, dtype=torch.float32)


def load_hf(directory: Path, dtype: torch.dtype = torch.float32, **impl):
    """transformers' base model in dtype (fp32 here), eval mode; for DeepSeekMoE the exact Qwen2-MoE equivalent of verify.py."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    margs = read_config(directory)
    if HF_CLASSES[margs.family] is None:
        from moee_ref.evaluation.verify import load_reference

        model = load_reference(directory, margs).model.to(dtype)  # its lm_head is built too, then dropped here
        if impl:
            use_impl(model, impl["attn_implementation"], impl["experts_implementation"])
        return model
    cls = getattr(transformers, HF_CLASSES[margs.family])
    return cls.from_pretrained(directory, dtype=dtype, **impl).eval()


def use_impl(model, attn: str, experts: str) -> None:
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    if model.config._experts_implementation != experts:
        model.set_experts_implementation(experts)


def ours_features(embedder: MoEEmbedder, texts: list[str], options: FeatureOptions = OPTIONS):
    feats = embedder.features(texts, options, batch_size=len(texts))
    return feats.hs, feats.rw


def whole_prompts(embedder: MoEEmbedder, texts: list[str]):
    """moee-ref without the shared prompt opening: every prompt run from its first token."""
    embedder.share_prefix = False
    try:
        return ours_features(embedder, texts)
    finally:
        embedder.share_prefix = True


# Mean pooling reads every position, so the last layer runs everywhere: the FLOPs transformers does, less padding.
ALL_POSITIONS = FeatureOptions(prompt="prompteol", pooling="mean")


def hf_features(model, tokenizer: Tokenizer, texts: list[str], device: str = "cpu"):
    """HS and RW the way moee-ref defines them: same ids, left padding, positions counting real tokens only."""
    sequences, _ = tokenizer.tokenize([apply_prompt(resolve_prompt(OPTIONS.prompt), t) for t in texts])
    batch = tokenizer.pad(sequences, padding_side="left")
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_router_logits=True, use_cache=False)
        rows, length = ids.shape
        hs = out.last_hidden_state[:, -1].float()
        rw = torch.cat([r.reshape(rows, length, -1)[:, -1].float().softmax(-1) for r in out.router_logits], dim=1)
    return hs.cpu().numpy(), rw.cpu().numpy()


def make_sides(embedder, hf, impls: dict) -> dict:
    """name -> function(texts) giving (HS, RW) with all texts in one batch."""

    def hf_side(attn, experts):
        def run(texts):
            use_impl(hf, attn, experts)
            return hf_features(hf, embedder.tokenizer, texts)

        return run

    return {"ours": lambda texts: ours_features(embedder, texts), **{name: hf_side(*impl) for name, impl in impls.items()}}


def check_parity(sides: dict, texts: list[str]) -> dict:
    hs, rw = sides["ours"](texts)
    errors = {}
    for name, side in sides.items():
        if name == "ours":
            continue
        ref_hs, ref_rw = side(texts)
        errors[name] = {"hs_rel": float(np.abs(hs - ref_hs).max() / np.abs(ref_hs).max()), "rw_abs": float(np.abs(rw - ref_rw).max())}
        print(f"parity on {len(texts)} texts, moee-ref vs {name}: HS max rel. error {errors[name]['hs_rel']:.2e}, "
              f"RW max abs. error {errors[name]['rw_abs']:.2e}", flush=True)
        if max(errors[name].values()) > PARITY_TOL:
            sys.exit(f"parity check failed against {name} (tolerance {PARITY_TOL:g}): not timing anything")
    return errors


# ---------------------------------------------------------------- machine rates and model arithmetic


def matmul_rate(runs: int = 3) -> dict:
    """fp32 GFLOP/s of MoE-shaped matmuls and a square 2048^3, through torch's default (F.linear / torch.mm: MKL)
    and through oneDNN with plain and packed weights (what moee-ref calls where torch has it); best of runs.
    The machine's rate is the best of all."""
    from moee_ref.kernels.onednn import _ONEDNN_LINEAR, pack_weight, packing_available

    shapes = {"160x2048 -> 2048": (160, 2048, 2048), "160x1024 -> 2048": (160, 1024, 2048), "2048^3": (2048, 2048, 2048)}
    rates = {}
    for name, (m, k, n) in shapes.items():
        a, w = torch.randn(m, k), torch.randn(n, k)
        calls = {"mm" if name == "2048^3" else "linear": (lambda: torch.mm(a, w.t())) if name == "2048^3" else (lambda: torch.nn.functional.linear(a, w))}
        if packing_available():
            packed = pack_weight(w)
            calls["oneDNN"] = lambda: _ONEDNN_LINEAR(a, w, None, "none", [], "")
            calls["oneDNN packed"] = lambda: _ONEDNN_LINEAR(a, packed, None, "none", [], "")
        for path, call in calls.items():
            inner = max(1, int(2e10 // (2 * m * k * n)))
            call()
            best = min(time_call(lambda: [call() for _ in range(inner)]) for _ in range(runs)) / inner
            rates[f"{path} {name}"] = 2 * m * k * n / best / 1e9
    return rates


def read_bandwidth(array: torch.Tensor, runs: int = 3) -> float:
    """Bytes/s of a sum() over an array far larger than the caches; best of runs."""
    best = min(time_call(array.sum) for _ in range(runs))
    return array.numel() * array.element_size() / best


def embedding_params(margs) -> int:
    return margs.vocab_size * margs.hidden_size


def useful_flops_per_token(margs) -> int:
    """2 x active parameters, without the embedding lookup and the LM head."""
    active = margs.parameter_counts()[1] - embedding_params(margs) * (1 if margs.tie_word_embeddings else 2)
    return 2 * active


def kv_params(margs) -> int:
    return 2 * margs.hidden_size * margs.num_kv_heads * margs.head_dim


def layer_matrix_params(margs, layer: int, experts_touched: int) -> int:
    """Parameters of the weight matrices one layer reads: attention, router, shared/dense MLP, touched experts."""
    d = margs.hidden_size
    attention = 2 * d * margs.num_heads * margs.head_dim + kv_params(margs)
    if layer not in margs.moe_layers:
        return attention + 3 * d * margs.dense_size
    shared = 3 * d * margs.shared_expert_size + (d if margs.shared_expert_gated else 0)
    return attention + margs.num_experts * d + shared + experts_touched * 3 * d * margs.expert_size


def batch1_bytes(model, tokenizer: Tokenizer, text: str, prefix: int) -> int:
    """fp32 bytes of the weight matrices that one text needs read: experts touched by its tokens per layer
    (the last layer runs at the last position only, so there only that token's experts; the prompt's opening,
    `prefix` tokens run once for all texts, is left out)."""
    margs = model.args
    sequence = tokenizer.tokenize([apply_prompt(resolve_prompt(OPTIONS.prompt), text)])[0][0]
    with torch.inference_mode():
        topk = model(torch.tensor([sequence])).topk_ids[0, :, prefix:]  # [L_moe, T - prefix, k]
    last = margs.num_layers - 1
    touched = {layer: len(torch.unique(topk[j, -1:] if layer == last else topk[j])) for j, layer in enumerate(margs.moe_layers)}
    return 4 * sum(layer_matrix_params(margs, layer, touched.get(layer, 0)) for layer in range(margs.num_layers))


def record_b1_matmuls(embedder: MoEEmbedder, text: str) -> list[tuple]:
    """The oneDNN matmuls one text at batch 1 makes, in order, as (input [rows, in], weight, bias): the same
    weights (packed as the model holds them) and shapes, random inputs. Empty where oneDNN does not serve."""
    from moee_ref.kernels import onednn as matmul

    calls, real = [], matmul._onednn_linear

    def record(x, weight, bias):
        calls.append((torch.randn(x.reshape(-1, x.shape[-1]).shape), weight, bias))
        return real(x, weight, bias)

    matmul._onednn_linear = record
    try:
        ours_features(embedder, [text])
    finally:
        matmul._onednn_linear = real
    return calls


def replay_matmuls(calls: list[tuple]) -> None:
    from moee_ref.kernels.onednn import _onednn_linear

    for x, weight, bias in calls:
        _onednn_linear(x, weight, bias)


def shared_prefix_tokens(embedder: MoEEmbedder) -> int:
    """Tokens of the prompt's fixed opening, which moee-ref runs once and reuses (at last-token pooling)."""
    opening = shared_prefix_ids(embedder.tokenizer, resolve_prompt(OPTIONS.prompt)) if embedder.share_prefix else None
    return 0 if opening is None else len(opening)


def skipped_flops_per_token(margs) -> int:
    """FLOPs per token moee-ref leaves out: the last layer's queries, output and MLP run at the last position only."""
    last = margs.num_layers - 1
    return 2 * (layer_matrix_params(margs, last, margs.top_k) - kv_params(margs))


def flops_done(margs, real_tokens: int, num_texts: int, prefix: int) -> int:
    """FLOPs moee-ref does for texts of real_tokens tokens in all (weight matrices only): each text's tokens after
    the shared opening of `prefix` tokens (run once), and in the last layer only the keys and values of all but
    the last token."""
    computed = real_tokens - prefix * num_texts
    return useful_flops_per_token(margs) * computed - skipped_flops_per_token(margs) * (computed - num_texts)


def skip_share(margs, real_tokens: int, num_texts: int, prefix: int) -> float:
    """Share of the useful FLOPs of a batch that moee-ref skips."""
    return 1 - flops_done(margs, real_tokens, num_texts, prefix) / (useful_flops_per_token(margs) * real_tokens)


# ---------------------------------------------------------------- measurements


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_interleaved(sides: dict, variants: dict, texts: list[str], b1_texts: list[str], b1_calls: list[list[tuple]], reps: int) -> dict:
    """Per rep: every side at batch 32, then moee-ref's variants (prompts run whole, every position computed),
    every side at batch 1 (per-text mean), moee-ref's batch-1 matmuls alone, then the machine's matmul rate. The read bandwidth of
    this shared host swings within seconds, so it is measured right before and right after each batch-1 timing,
    and that timing's floor uses the mean of the two."""
    for side in (*sides.values(), *variants.values()):  # warm-up
        side(texts), side(b1_texts[:1])
    replay_matmuls(b1_calls[0])
    big = torch.ones(1 << 28)  # 1 GiB of fp32, far beyond the L3 cache
    b1_timings = {**{name: lambda t, side=side: side([t]) for name, side in sides.items()}, "matmuls": None}
    times = {"b32": {n: [] for n in sides}, "b32_variants": {n: [] for n in variants}, "b1": {n: [] for n in b1_timings},
             "b1_bandwidth": {n: [] for n in b1_timings}, "matmul": []}
    for rep in range(reps):
        for name, side in sides.items():
            times["b32"][name].append(time_call(lambda: side(texts)))
        for name, variant in variants.items():
            times["b32_variants"][name].append(time_call(lambda: variant(texts)))
        for name, one_text in b1_timings.items():
            before = read_bandwidth(big)
            if one_text is None:
                seconds = statistics.mean(time_call(lambda: replay_matmuls(calls)) for calls in b1_calls)
            else:
                seconds = statistics.mean(time_call(lambda: one_text(t)) for t in b1_texts)
            times["b1_bandwidth"][name].append((before + read_bandwidth(big)) / 2)
            times["b1"][name].append(seconds)
        times["matmul"].append(matmul_rate())
        print(f"rep {rep + 1}/{reps}: b32 " + ", ".join(f"{n} {times['b32'][n][-1]:.2f}s" for n in sides), flush=True)
    return times


def warm_page_cache(directory: Path) -> None:
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as handle:
            while handle.read(1 << 26):
                pass


def measure_loads(directory: Path, args, runs: int) -> dict:
    """Load time and peak RSS of each side (and of the load floor) in its own child process; median over runs,
    in alternating order."""
    results = {"ours": [], "hf": [], "floor": []}
    for run in range(runs):
        for side in ("ours", "hf", "floor") if run % 2 == 0 else ("floor", "hf", "ours"):
            command = [sys.executable, __file__, "--child", side, "--dir", str(directory), "--threads", str(args.threads),
                       "--batch-large", str(args.batch_large)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"child process '{side}' failed (exit {done.returncode}; a negative code is a signal, "
                         f"-9 often the OOM killer):\n{done.stderr[-2000:]}")
            results[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {side: {key: statistics.median(r[key] for r in runs_) for key in runs_[0]} for side, runs_ in results.items()}


def import_hf_classes(family: str) -> None:
    """Import transformers and the model's module (lazily imported on first use) before a load is timed."""
    import transformers

    getattr(transformers, HF_CLASSES[family] or "Qwen2MoeForCausalLM")


def load_floor(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """What any load that casts to fp32 once has to do, and nothing else: read every tensor moee-ref loads
    with its pread reader (reading ahead) and widen it into one fresh fp32 arena; the embedding table gets a
    tensor of its own, kept bf16/fp16 as stored, as moee-ref keeps it. No model, no packing, no checks."""
    from moee_ref.loading.checkpoint import ReadAhead, ShardReader, expected_shapes, name_map_groups, shard_files

    shapes = {n: s for n, s in expected_shapes(name_map_groups(read_config(directory))).items() if n != "lm_head.weight"}
    embed = "model.embed_tokens.weight"
    arena = torch.empty(sum(math.prod(s) for n, s in shapes.items() if n != embed), dtype=torch.float32)
    offset = 0
    with ShardReader(shard_files(directory)).reading() as shards, ReadAhead(shards.read, list(shapes)) as ahead:
        for name in shapes:
            tensor = ahead.read(name)
            if name == embed:
                table = tensor if tensor.dtype in (torch.bfloat16, torch.float16) else tensor.float()
                continue
            arena[offset : offset + tensor.numel()].view(tensor.shape).copy_(tensor)
            offset += tensor.numel()
    return arena, table


def child_main(args) -> None:
    """Load one side (timed, imports excluded), embed the batch-32 set once, print time and peak RSS as JSON.
    The floor child only loads."""
    directory = Path(args.dir)
    if args.child == "floor":
        start = time.perf_counter()
        load_floor(directory)
        load_s = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"load_s": load_s, "embed_s": 0.0, "load_peak_rss_kib": rss, "peak_rss_kib": rss}))
        return
    if args.child == "hf":
        import_hf_classes(read_config(directory).family)
    start = time.perf_counter()
    if args.child == "ours":
        embedder = load_ours(directory)
        load_s = time.perf_counter() - start
        run = lambda texts: ours_features(embedder, texts)  # noqa: E731
    else:
        model = load_hf(directory, attn_implementation="eager", experts_implementation="eager")
        tokenizer = Tokenizer.from_dir(directory)  # moee-ref's tokenizer serves both sides
        load_s = time.perf_counter() - start
        run = lambda texts: hf_features(model, tokenizer, texts)  # noqa: E731
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    texts = make_texts(Tokenizer.from_dir(directory), args.batch_large)
    embed_s = time_call(lambda: run(texts))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"load_s": load_s, "embed_s": embed_s, "load_peak_rss_kib": load_peak, "peak_rss_kib": rss}))


# ---------------------------------------------------------------- report


def machine_facts(threads: int) -> dict:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def summarize(margs, tokens: int, padded: int, num_texts: int, prefix: int, b1_bytes, b1_tokens, b1_calls, times, loads, impls) -> dict:
    med = statistics.median
    # Machine capabilities: noise only lowers them, so the best over reps (each already a best of 3) is the reference.
    rate_by_shape = {k: max(r[k] for r in times["matmul"]) for k in times["matmul"][0]}
    rate = max(rate_by_shape.values()) * 1e9
    # The read bandwidth of this shared host swings within seconds (2x seen), so each batch-1 timing has its own
    # floor, from the bandwidth measured around it, and the median of the ratios is reported.
    bandwidth = med(times["b1_bandwidth"]["ours"])
    b1_floor = {n: [statistics.mean(b1_bytes) / bw for bw in times["b1_bandwidth"][n]] for n in times["b1"]}
    floor_ratios = {n: med(t / f for t, f in zip(times["b1"][n], b1_floor[n])) for n in times["b1"]}
    return {
        "matmul_gflops_by_shape": rate_by_shape,
        "matmul_gflops": max(rate_by_shape.values()),
        "bandwidth_gbs": bandwidth / 1e9,
        "real_tokens_b32": tokens,
        "padded_positions_b32": padded,
        "useful_gflop_b32": useful_flops_per_token(margs) * tokens / 1e9,
        "b32_s": {n: med(v) for n, v in times["b32"].items()},
        "b32_variants_s": {n: med(v) for n, v in times["b32_variants"].items()},
        "b1_floor_ratio": {n: floor_ratios[n] for n in times["b32"]},
        "b1_matmuls_s": med(times["b1"]["matmuls"]),
        "b1_matmuls_floor_ratio": floor_ratios["matmuls"],
        "b1_s": {n: med(times["b1"][n]) for n in times["b32"]},
        "b1_floor_s": statistics.mean(b1_bytes) / bandwidth,
        # The issue calls batch 1 memory-bound; the matrices every token goes through (attention, dense, shared)
        # see all of a prompt's tokens, so the compute time can exceed the read time: the roofline takes the larger.
        "b1_roofline_s": statistics.mean(max(b / bandwidth, flops_done(margs, t, 1, prefix) / rate) for b, t in zip(b1_bytes, b1_tokens)),
        # The same bound taken call by call: each matmul is bound by its own bytes or its own FLOPs, whichever is
        # slower; a call with 16 rows is compute-bound where one with 2 rows is memory-bound.
        "b1_call_roofline_s": statistics.mean(
            sum(max(4 * w.numel() / bandwidth, 2 * len(x) * w.numel() / rate) for x, w, _ in calls) for calls in b1_calls
        ),
        "b1_bytes_mean": statistics.mean(b1_bytes),
        "loads": loads,
        "fp32_weight_bytes": (margs.parameter_counts()[0] - (0 if margs.tie_word_embeddings else embedding_params(margs))) * 4,
        "fp32_weight_bytes_with_lm_head": margs.parameter_counts()[0] * 4,
        "skip_share": skip_share(margs, tokens, num_texts, prefix),
        "impls": impls,
    }


def table_rows(r: dict, n32: int) -> list[tuple]:
    """Rows of metric | moee-ref | each transformers configuration | ratio (vs eager) | target | met?"""
    hf = [n for n in r["b32_s"] if n != "ours"]
    base, fast32, fast1 = hf[0], min(hf, key=r["b32_s"].get), min(hf, key=r["b1_s"].get)
    thr = {n: n32 / t for n, t in r["b32_s"].items()}
    gflops = {n: r["useful_gflop_b32"] / t for n, t in r["b32_s"].items()}
    share = {n: g / r["matmul_gflops"] for n, g in gflops.items()}
    b1_ms = {n: 1e3 * t for n, t in r["b1_s"].items()}
    floor = r["b1_floor_ratio"]
    variants = r["b32_variants_s"]
    all_ratio = r["b32_s"][base] / variants["all_positions"]
    ld = r["loads"]
    rss_gib = {s: ld[s]["peak_rss_kib"] / 2**20 for s in ("ours", "hf")}
    rss_share = {s: ld[s]["peak_rss_kib"] * 1024 / r["fp32_weight_bytes"] for s in ("ours", "hf")}
    load_ratio = ld["ours"]["load_s"] / ld["hf"]["load_s"]
    errors = {key: {n: r["parity"][n][key] for n in hf} for key in ("hs_rel", "rw_abs")}

    def row(metric, values, fmt, ratio=None, target="", ok=None, caveat=False):
        cells = [fmt.format(values[n]) if n in values else "" for n in ("ours", *hf)]
        verdict = "" if ok is None else ("yes" if ok else "NO") + ("*" if caveat else "")
        return (metric, *cells, "" if ratio is None else f"{ratio:.2f}x", target, verdict)

    skips = r["skip_share"] > SKIP_CAVEAT  # few layers: moee-ref's last-layer shortcut dominates

    def side_by_side(values):  # load and RSS: one transformers load serves both configurations
        return {"ours": values["ours"], base: values["hf"]}

    return [
        row("HS max rel. err vs moee-ref", errors["hs_rel"], "{:.1e}", None, f"<= {PARITY_TOL:g}", max(errors["hs_rel"].values()) <= PARITY_TOL),
        row("RW max abs. err vs moee-ref", errors["rw_abs"], "{:.1e}", None, f"<= {PARITY_TOL:g}", max(errors["rw_abs"].values()) <= PARITY_TOL),
        row(f"b{n32} time per batch (s)", r["b32_s"], "{:.3f}"),
        row(f"b{n32} throughput (texts/s)", thr, "{:.1f}", thr["ours"] / thr[base], f">= {TARGETS['b32_speedup']:g}x",
            thr["ours"] / thr[base] >= TARGETS["b32_speedup"], skips),
        row(f"  vs fastest transformers ({fast32})", {}, "", thr["ours"] / thr[fast32], "(info)"),
        row("  prompts run whole (share_prefix=False)", {"ours": n32 / variants["whole_prompts"]}, "{:.1f}",
            r["b32_s"][base] / variants["whole_prompts"], "(info)"),
        row(f"b{n32} throughput, every position computed", {"ours": n32 / variants["all_positions"]}, "{:.1f}", all_ratio,
            f">= {TARGETS['b32_speedup']:g}x", all_ratio >= TARGETS["b32_speedup"]),
        row(f"b{n32} useful GFLOP/s", gflops, "{:.1f}", gflops["ours"] / gflops[base]),
        row(f"b{n32} share of matmul rate", share, "{:.0%}", None, f">= {TARGETS['b32_matmul_share']:.0%}",
            share["ours"] >= TARGETS["b32_matmul_share"], skips),
        row("  same, FLOPs moee-ref does (see note)", {"ours": share["ours"] * (1 - r["skip_share"])}, "{:.0%}", None, "(info)"),
        row("b1 latency per text (ms)", b1_ms, "{:.1f}", b1_ms["ours"] / b1_ms[base], "(report)"),
        row(f"  vs fastest transformers ({fast1})", {}, "", b1_ms["ours"] / b1_ms[fast1], "(info)"),
        row("b1 floor: bytes read / bandwidth (ms)", {"ours": 1e3 * r["b1_floor_s"]}, "{:.1f}"),
        row("b1 latency / floor (median of per-rep ratios)", floor, "{:.2f}", None, f"<= {TARGETS['b1_floor']:g}", floor["ours"] <= TARGETS["b1_floor"]),
        *([row("  moee-ref's b1 matmuls alone (ms)", {"ours": 1e3 * r["b1_matmuls_s"]}, "{:.1f}", None, "(info)"),
           row("  matmuls alone / floor (median of per-rep ratios)", {"ours": r["b1_matmuls_floor_ratio"]}, "{:.2f}", None, "(info)")]
          if r["b1_matmuls_recorded"] else []),  # none recorded: torch without oneDNN
        row("  roofline: max(floor, FLOPs / matmul rate) (ms)", {"ours": 1e3 * r["b1_roofline_s"]}, "{:.1f}", None, "(info)"),
        row("  latency / roofline", {n: t / r["b1_roofline_s"] for n, t in r["b1_s"].items()}, "{:.2f}", None, "(info)"),
        *([row("  roofline call by call, moee-ref's matmuls (ms)", {"ours": 1e3 * r["b1_call_roofline_s"]}, "{:.1f}", None, "(info)"),
           row("  latency / call-by-call roofline", {"ours": r["b1_s"]["ours"] / r["b1_call_roofline_s"]}, "{:.2f}", None, "(info)")]
          if r["b1_matmuls_recorded"] else []),
        row("load time (s), own process", side_by_side({s: ld[s]["load_s"] for s in ld}), "{:.1f}", load_ratio,
            f"<= {TARGETS['load']:g}x", load_ratio <= TARGETS["load"]),
        row("  floor: read + widen to fp32 only, no model (s)", {"ours": ld["floor"]["load_s"]}, "{:.1f}",
            ld["floor"]["load_s"] / ld["hf"]["load_s"], "(info)"),
        row(f"peak RSS, load + b{n32} (GiB)", side_by_side(rss_gib), "{:.2f}", rss_gib["ours"] / rss_gib["hf"]),
        row("peak RSS / fp32 weights w/o lm_head", side_by_side(rss_share), "{:.2f}", None, f"<= {TARGETS['rss']:g}",
            rss_share["ours"] <= TARGETS["rss"]),
    ]


def print_report(r: dict, margs, args, facts: dict) -> None:
    impls = r["impls"]
    print(f"\nmachine: {facts['cpu']}, {facts['cpu_count']} CPUs, {facts['threads']} threads; torch {facts['torch']}, "
          f"transformers {facts['transformers']}, python {facts['python']}")
    print(f"model: {margs.family}, {margs.num_layers} layer(s) of the real dimensions, random bf16 weights computed in fp32; "
          f"{r['real_tokens_b32']} real tokens in the batch-{args.batch_large} set, padded to {r['padded_positions_b32']} positions "
          f"(transformers computes the padding everywhere, moee-ref in attention only); useful FLOPs = 2 x active parameters "
          f"(no embedding, no LM head) = {useful_flops_per_token(margs) / 1e6:.0f} MFLOP per token")
    print("fp32 matmul rate (GFLOP/s, best of reps): " + ", ".join(f"{k} {v:.1f}" for k, v in r["matmul_gflops_by_shape"].items())
          + f"; reference = best = {r['matmul_gflops']:.1f}")
    around = r["raw_times"]["b1_bandwidth"]["ours"]
    print(f"read bandwidth (1 GiB fp32 sum, best of 3, around moee-ref's batch-1 timings, median of reps): {r['bandwidth_gbs']:.1f} GB/s "
          f"(reps: {', '.join(f'{b / 1e9:.1f}' for b in around)}); batch-1 bytes per text (mean of {NUM_B1_TEXTS}): "
          f"{r['b1_bytes_mean'] / 1e9:.2f} GB")
    print(f"fp32 weights: {r['fp32_weight_bytes'] / 2**30:.2f} GiB without lm_head (moee-ref does not load it), "
          f"{r['fp32_weight_bytes_with_lm_head'] / 2**30:.2f} GiB with it")
    hf_names = {n: f"transformers ({n})" for n in impls}
    header = ("metric", "moee-ref", *hf_names.values(), "ratio", "target", "met?")
    rows = [header, *table_rows(r, args.batch_large)]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    print()
    for i, row in enumerate(rows):
        print(" | ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print("\ncolumns: " + "; ".join(f"transformers ({n}) = attn_implementation={a!r}, experts_implementation={e!r}" for n, (a, e) in impls.items()))
    lm_head = "an lm_head the DeepSeekMoE equivalent builds included" if margs.family == "deepseek" else "no lm_head"
    print("ratio = moee-ref / transformers (eager), the issue's baseline; medians over reps; b1 = per text, one at a time, "
          f"over {NUM_B1_TEXTS} texts. Load and RSS: one model per child process (median of up to 3 runs); transformers "
          f"loaded eager ({lm_head}; one load serves both configurations); moee-ref without lm_head.")
    star = "* " if r["skip_share"] > SKIP_CAVEAT else ""
    print(f"{star}note: moee-ref runs the last layer's queries and MLP at the last position only, and the prompt's opening "
          f"({r['shared_prefix_tokens']} tokens) once; at {margs.num_layers} layer(s) that skips {r['skip_share']:.0%} of the "
          "useful FLOPs transformers computes (less with more layers). The row "
          "'every position computed' runs every position of every text (mean pooling): the like-for-like figure.")
    print(f"\nreproduce: python bench/bench_cpu.py --family {margs.family} --layers {margs.num_layers} --reps {args.reps} "
          f"--threads {args.threads} --batch-large {args.batch_large}" + (f" --tokenizer {args.tokenizer}" if args.tokenizer else ""))


def profile_b32(sides: dict, texts: list[str], rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, side in sides.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            side(texts)
        print(f"\n--- profile, {name}, batch {len(texts)}: top ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(HF_CLASSES), default="olmoe")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the real dimensions (default 2; all allowed)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch-large", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=Path("~/.cache/moee-ref-bench").expanduser())
    p.add_argument("--tokenizer", type=Path, help="a directory with a real model's tokenizer files (tokenizer.json, "
                   "tokenizer_config.json) to use instead of the checkpoint's synthetic tokenizer")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler top ops of each side at the large batch")
    p.add_argument("--child", choices=("ours", "hf", "floor"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child_main(args)
    facts = machine_facts(args.threads)
    if not parse_config(family_config(args.family, args.layers)).moe_layers:
        sys.exit(f"{args.family} with {args.layers} layer(s) has no MoE layer; pass more --layers")
    directory = ensure_checkpoint(args.workdir.expanduser(), args.family, args.layers)
    if args.tokenizer:
        directory = with_tokenizer(directory, args.tokenizer)
    margs = read_config(directory)
    tokenizer = Tokenizer.from_dir(directory)
    texts = make_texts(tokenizer, args.batch_large)
    b1_texts = texts[:NUM_B1_TEXTS]
    counts = [token_count(tokenizer, t) for t in texts]
    print(f"{len(texts)} PromptEOL texts of {min(counts)}..{max(counts)} tokens ({sum(counts)} in all)", flush=True)

    warm_page_cache(directory)
    loads = measure_loads(directory, args, runs=min(args.reps, 3))  # before this process holds two models
    print("load: " + ", ".join(f"{s} {v['load_s']:.2f}s / {v['peak_rss_kib'] / 2**20:.2f} GiB peak" for s, v in loads.items()), flush=True)

    embedder = load_ours(directory)
    hf = load_hf(directory)
    impls = {"eager": ("eager", "eager"), "default": (hf.config._attn_implementation, hf.config._experts_implementation)}
    sides = make_sides(embedder, hf, impls)
    parity = check_parity(sides, texts)
    prefix = shared_prefix_tokens(embedder)
    b1_bytes = [batch1_bytes(embedder.model, tokenizer, t, prefix) for t in b1_texts]
    b1_calls = [record_b1_matmuls(embedder, t) for t in b1_texts]
    variants = {"whole_prompts": lambda t: whole_prompts(embedder, t), "all_positions": lambda t: ours_features(embedder, t, ALL_POSITIONS)}
    times = run_interleaved(sides, variants, texts, b1_texts, b1_calls, args.reps)
    results = {**summarize(margs, sum(counts), len(texts) * max(counts), len(texts), prefix, b1_bytes, counts[:NUM_B1_TEXTS], b1_calls, times, loads, impls),
               "parity": parity, "machine": facts, "b1_matmuls_recorded": any(b1_calls), "shared_prefix_tokens": prefix,
               "args": {k: str(v) for k, v in vars(args).items() if k not in ("child", "dir")}, "raw_times": times}
    print_report(results, margs, args, facts)
    if args.profile:
        profile_b32(sides, texts)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
