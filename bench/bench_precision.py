"""float32, bf16 and int8 on a checkpoint with a real family's dimensions: speed, memory and quality.

For each mode, as `MoEEmbedder.from_pretrained` gives it (float32 packed for
oneDNN, bf16 weights as stored, int8 with bf16 compute where bf16 is native):
weight bytes, load time, texts/s at batch 32, ms per text at batch 1, and,
against float32, the cosine of HS and RW rows and the share of top-k expert
sets (token x MoE layer) that change, and batch invariance: the smallest cosine of
a text's HS or RW alone against its row in the batch of all texts. Beside them, transformers in bf16 with
sdpa attention (eager for gpt-oss, whose sinks have no sdpa path there), what a user would otherwise pick (needs the test extra).

    python bench/bench_precision.py                          # OLMoE dimensions, 2 layers
    python bench/bench_precision.py --family deepseek --layers 3

The checkpoint is built once in --workdir (random weights, bf16, as
bench_cpu.py builds it) and reused. All modes run in this one process, one
after the other, each freed before the next is loaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import moee_ref  # noqa: F401  first, before torch: its OpenMP wait setting applies (moee_ref/threads_wait.py)
import numpy as np
import torch

from moee_ref import MoEEmbedder, read_config
from moee_ref.demo.checkpoints import write_random_checkpoint
from moee_ref.families import FAMILIES
from moee_ref.embedding.embedder import FeatureOptions
from moee_ref.kernels.int8 import int8_kernel_rows
from moee_ref.kernels.precision import resolve_dtype

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs"
OPTIONS = FeatureOptions(prompt="prompteol")  # what bench_cpu.py's transformers side feeds too
WORDS = ("the model routes every token to a few experts while the router learns which expert fits "
         "language music market weather city river science history garden quietly rapidly").split()


def prompts(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(12, 40)))) for _ in range(count)]


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def timed(run, texts: list[str], batch1: int, reps: int):
    """(last batch-32 result, texts/s at batch 32, median ms per text at batch 1) of run(list of texts)."""
    for _ in range(2):  # warm-up: oneDNN builds a kernel per shape it meets, and float32 meets many
        run(texts)
        run(texts[:1])
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        result = run(texts)
        times.append(time.perf_counter() - start)
    one = []
    for text in texts[:batch1]:
        start = time.perf_counter()
        run([text])
        one.append(time.perf_counter() - start)
    return result, len(texts) / statistics.median(times), 1000 * statistics.median(one)


def measure(directory: Path, dtype: torch.dtype, int8: bool, texts: list[str], batch1: int, reps: int) -> dict:
    start = time.perf_counter()
    embedder = MoEEmbedder.from_pretrained(directory, dtype=dtype, int8=int8)
    load_s = time.perf_counter() - start
    feats, rate, b1_ms = timed(lambda t: embedder.features(t, OPTIONS, batch_size=len(t)), texts, batch1, reps)
    # Batch invariance: each of the first texts alone against its row of the batch of all.
    alone = [embedder.features([t], OPTIONS) for t in texts[:batch1]]
    invariance = min(float(cosines(np.concatenate([a.hs for a in alone]), feats.hs[:batch1]).min()),
                     float(cosines(np.concatenate([a.rw for a in alone]), feats.rw[:batch1]).min()))
    batch = embedder.tokenizer.encode_batch(texts)
    with torch.inference_mode():
        topk = embedder.model(batch.input_ids, batch.attention_mask).topk_ids.sort(-1).values
    result = {"weight_bytes": model_bytes(embedder.model), "load_s": load_s, "b32_texts_per_s": rate, "b1_ms": b1_ms,
              "alone_vs_batched_cos_min": invariance, "hs": feats.hs, "rw": feats.rw, "topk": topk, "mask": batch.attention_mask.bool()}
    return result  # the model is freed with this frame, before the next mode loads


def measure_transformers(directory: Path, texts: list[str], batch1: int, reps: int) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_cpu import hf_features, load_hf
    from moee_ref.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(directory)
    start = time.perf_counter()
    # sdpa, what a user gets by default; gpt-oss's sinks have only transformers' eager attention
    attention = "eager" if read_config(directory).family == "gpt_oss" else "sdpa"
    model = load_hf(directory, torch.bfloat16, attn_implementation=attention)
    load_s = time.perf_counter() - start
    (hs, rw), rate, b1_ms = timed(lambda t: hf_features(model, tokenizer, t), texts, batch1, reps)
    result = {"weight_bytes": model_bytes(model), "load_s": load_s, "b32_texts_per_s": rate, "b1_ms": b1_ms, "hs": hs, "rw": rw}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="olmoe", choices=sorted(FAMILIES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--batch1", type=int, default=8, help="texts timed one at a time")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "moee-ref-bench"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers bf16 row")
    args = parser.parse_args()

    config = json.loads((CONFIGS / f"{args.family}.json").read_text())
    config["num_hidden_layers"] = args.layers
    config.pop("quantization_config", None)  # the random checkpoint is written unquantized (gpt-oss's MXFP4 is not)
    if "layer_types" in config:  # gpt-oss: one entry per layer
        config["layer_types"] = config["layer_types"][: args.layers]
    directory = Path(args.workdir) / f"{args.family}-{args.layers}layers-bf16"
    if not (directory / "config.json").is_file():
        write_random_checkpoint(directory, config, dtype="bfloat16", max_shard_bytes=2**30)

    auto, reason = resolve_dtype("auto")
    texts = prompts(args.texts)
    modes = {"float32": (torch.float32, False), "bfloat16": (torch.bfloat16, False), f"int8 ({str(auto)[6:]})": (auto, True)}
    results = {name: measure(directory, dtype, int8, texts, args.batch1, args.reps) for name, (dtype, int8) in modes.items()}
    if not args.no_transformers:
        results["transformers bf16"] = measure_transformers(directory, texts, args.batch1, args.reps)

    ref = results["float32"]
    real = ref["mask"][:, None, :].expand(-1, ref["topk"].shape[1], -1)
    print(f"{args.family}, {args.layers} layers of the real dimensions, {len(texts)} texts (random weights), "
          f"{torch.get_num_threads()} threads; auto dtype here: {str(auto)[6:]} ({reason}); "
          f"int8 kernel for up to {int8_kernel_rows()} rows")
    print(f"{'mode':<18} {'weights GiB':>11} {'load s':>7} {'b32 texts/s':>11} {'b1 ms':>7} {'b1 vs f32':>9} "
          f"{'cos HS min':>10} {'cos RW min':>10} {'top-k sets changed':>18} {'alone vs batched cos':>20}")
    summary = {"family": args.family, "layers": args.layers, "texts": len(texts), "auto": str(auto), "auto_reason": reason, "modes": {}}
    for name, r in results.items():
        cos_hs, cos_rw = cosines(ref["hs"], r["hs"]), cosines(ref["rw"], r["rw"])
        changed = float((ref["topk"] != r["topk"]).any(-1)[real].float().mean()) if "topk" in r else float("nan")
        print(f"{name:<18} {r['weight_bytes'] / 2**30:>11.2f} {r['load_s']:>7.1f} {r['b32_texts_per_s']:>11.1f} {r['b1_ms']:>7.1f} "
              f"{r['b1_ms'] / ref['b1_ms']:>9.2f} {cos_hs.min():>10.5f} {cos_rw.min():>10.5f} {100 * changed:>17.2f}% "
              f"{r.get('alone_vs_batched_cos_min', float('nan')):>20.6f}")
        summary["modes"][name] = {k: v for k, v in r.items() if k not in ("hs", "rw", "topk", "mask")} | {
            "cos_hs_min": float(cos_hs.min()), "cos_rw_min": float(cos_rw.min()), "topk_sets_changed": changed}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
