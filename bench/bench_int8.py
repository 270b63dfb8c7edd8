"""int8 against float32 weights on a checkpoint with a real family's dimensions.

Prints the weight memory of both, the time to embed the same prompts, the
cosine between int8 and float32 embeddings (HS and RW separately, min and
mean over texts) and the share of top-k expert choices (per token and MoE
layer) that change.

    python bench/bench_int8.py                          # OLMoE dimensions, 2 layers
    python bench/bench_int8.py --family deepseek --layers 3

The checkpoint is built once in --workdir (random weights, bf16, as
bench_cpu.py builds it) and reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from moee_ref import MoEEmbedder, load_model
from moee_ref.demo.checkpoints import write_random_checkpoint
from moee_ref.tokenizer import Tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs"
WORDS = ("the model routes every token to a few experts while the router learns which expert fits "
         "language music market weather city river science history garden quietly rapidly").split()


def prompts(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(12, 40)))) for _ in range(count)]


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="olmoe", choices=["olmoe", "qwen2_moe", "deepseek"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "moee-ref-bench"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    config = json.loads((CONFIGS / f"{args.family}.json").read_text())
    config["num_hidden_layers"] = args.layers
    directory = Path(args.workdir) / f"{args.family}-{args.layers}layers-bf16"
    if not (directory / "config.json").is_file():
        write_random_checkpoint(directory, config, dtype="bfloat16", max_shard_bytes=2**30)

    texts = prompts(args.texts)
    results = {}
    outputs = {}
    for name, int8 in (("float32", False), ("int8", True)):
        start = time.perf_counter()
        model = load_model(directory, int8=int8, lm_head=False)
        load_s = time.perf_counter() - start
        embedder = MoEEmbedder(model, Tokenizer.from_dir(directory), batch_size=16)
        embedder.features(texts[:4], show_progress_bar=False)  # warm-up
        start = time.perf_counter()
        feats = embedder.features(texts, show_progress_bar=False)
        embed_s = time.perf_counter() - start
        batch = embedder.tokenizer.encode_batch(texts)
        with torch.inference_mode():
            topk = model(batch.input_ids, batch.attention_mask).topk_ids.sort(-1).values
        outputs[name] = (feats.hs, feats.rw, topk, batch.attention_mask.bool())
        results[name] = {"weight_bytes": model_bytes(model), "load_s": load_s, "embed_s": embed_s}
        del model, embedder

    hs32, rw32, top32, mask = outputs["float32"]
    hs8, rw8, top8, _ = outputs["int8"]
    cos_hs, cos_rw = cosines(hs32, hs8), cosines(rw32, rw8)
    real = mask[:, None, :].expand(-1, top32.shape[1], -1)
    changed = float((top32 != top8).any(-1)[real].float().mean())
    changed_slots = float((top32 != top8)[real].float().mean())
    summary = {
        "family": args.family, "layers": args.layers, "texts": len(texts),
        "weight_bytes_ratio": results["int8"]["weight_bytes"] / results["float32"]["weight_bytes"],
        "embed_time_ratio": results["int8"]["embed_s"] / results["float32"]["embed_s"],
        "cos_hs_min": float(cos_hs.min()), "cos_hs_mean": float(cos_hs.mean()),
        "cos_rw_min": float(cos_rw.min()), "cos_rw_mean": float(cos_rw.mean()),
        "topk_sets_changed": changed, "topk_slots_changed": changed_slots, **{k: v for k, v in results.items()},
    }
    gib = 2**30
    print(f"{args.family}, {args.layers} layers of the real dimensions, {len(texts)} texts (random weights)")
    print(f"{'':10} {'weights':>10} {'load':>8} {'embed':>8}")
    for name in ("float32", "int8"):
        r = results[name]
        print(f"{name:10} {r['weight_bytes'] / gib:8.2f} GiB {r['load_s']:7.1f}s {r['embed_s']:7.2f}s")
    print(f"int8 / float32: weights {summary['weight_bytes_ratio']:.3f}, embed time {summary['embed_time_ratio']:.2f}")
    print(f"cosine int8 vs float32: HS min {cos_hs.min():.5f} mean {cos_hs.mean():.5f}; RW min {cos_rw.min():.5f} mean {cos_rw.mean():.5f}")
    print(f"top-k expert sets that change (token x MoE layer): {100 * changed:.2f}%; single top-k slots: {100 * changed_slots:.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
