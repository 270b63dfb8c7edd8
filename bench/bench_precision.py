"""float32, bf16 and int8 on a checkpoint with a real family's dimensions: speed, memory and quality.

For each mode, as `MoEEmbedder.from_pretrained` gives it (float32 packed for
oneDNN, bf16 weights as stored, int8 with bf16 compute where bf16 is native):
weight bytes, load time, peak RSS, texts/s at batch 32 and its share of the
machine's bf16 matmul rate, ms per text at batch 1 against that mode's read
floor (the bytes of the matrices the text touches, at the mode's size, over the
read bandwidth measured right after), and, against the reference, the cosine of
HS and RW rows and the share of top-k expert sets (token x MoE layer) that
change, and batch invariance: the smallest cosine of a text's HS or RW alone
against its row in the batch of all texts. Beside them, transformers in bf16
with sdpa attention (eager for gpt-oss, whose sinks have no sdpa path there),
what a user would otherwise pick (needs the test extra). On a CPU that
computes bf16 slowly (emulated: "auto" chooses float32 there) the bf16 modes
would only measure the emulation, so the rows are float32, int8 (float32
compute) and transformers in float32 with sdpa, and the rate column is the
float32 matmul rate's share.

    python bench/bench_precision.py                          # OLMoE dimensions, 2 layers
    python bench/bench_precision.py --family deepseek --layers 3
    python bench/bench_precision.py --layers 16              # OLMoE at full depth: 13.8 GB of shards
    python bench/bench_precision.py --interleave float32,int8  # batch 1 only, the modes in turn, one process
    python bench/bench_precision.py --modes float32,int8,int8-cached,int8-weight-only

int8 is timed as the loader gives it (kernels/int8.py: int8 x int8 through
fbgemm with VNNI, int8 x int16 through int8_avx2.c on AVX2 without it, else
weight-only) and its load with the prepared cache (loading/prepared.py, in
--cache-dir) emptied first, so that row's load quantizes and writes the cache;
int8-cached loads from that cache; int8-weight-only, int8-integer,
int8-fbgemm and int8-avx2 force one matmul (MOEE_INT8_KERNEL) for a comparison
on the same machine. To time a CPU as if it had AVX2 only, cap all
three libraries: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
FBGEMM_ENABLE_INSTRUCTIONS=AVX2 (the children inherit them).

Every mode runs in a process of its own, one after the other, so that each
peak RSS is its own and full depth fits: OLMoE's 16 layers hold 13.8 GB in
bf16 and 27.7 GB in float32. The reference is float32 when it fits in
memory; where the loader refuses it, float64 layer-streamed on the first
--reference-texts texts (the loader decides, before any weight is read).

--interleave loads the modes named side by side in one process (they must fit
together) and times their batch-1 calls in turn, text by text: on a host
whose speed drifts between processes (one ran the same float32 batch-1 call
at 270 and 371 ms minutes apart) their ratio is then measured in the same
moments.

The checkpoint is built once in --workdir (random weights, bf16, as
bench_cpu.py builds it) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import moee_ref  # noqa: F401  first, before torch: its OpenMP wait setting applies (moee_ref/threads_wait.py)
import numpy as np
import torch

from moee_ref import MoEEmbedder, read_config
from moee_ref.loading.memory import InsufficientMemoryError, format_bytes, memory_available
from moee_ref.demo.checkpoints import write_random_checkpoint
from moee_ref.families import FAMILIES
from moee_ref.embedding.embedder import FeatureOptions
from moee_ref.kernels.int8 import KERNEL_ENV, integer_reason
from moee_ref.loading.prepared import PreparedCache
from moee_ref.kernels.onednn import linear, pack_weight, packing_available
from moee_ref.kernels.precision import resolve_dtype

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs"
OPTIONS = FeatureOptions(prompt="prompteol")  # what bench_cpu.py's transformers side feeds too
WORDS = ("the model routes every token to a few experts while the router learns which expert fits "
         "language music market weather city river science history garden quietly rapidly").split()


def prompts(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(12, 40)))) for _ in range(count)]


def model_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers, and a byte a weight for int8 matrices on the integer path (held in fbgemm's packed
    copies, not in buffers)."""
    from moee_ref.kernels.int8 import Int8Linear, Int8RoutedExperts

    packed = 0
    for module in model.modules():
        if isinstance(module, Int8Linear) and module.packed is not None:
            packed += int(np.prod(module.shape))
        elif isinstance(module, Int8RoutedExperts) and module.packed is not None:
            packed += sum(int(np.prod(shape)) for shape in module.shapes)
    return packed + sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


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


def first_text_s(run, texts: list[str]) -> float:
    """Seconds of the first text embedded after the load: what a load that maps its weights without reading them
    (llama.cpp's) pays there instead. Load plus this is the time to the first vector."""
    start = time.perf_counter()
    run(texts[:1])
    return time.perf_counter() - start


def drop_page_cache() -> None:
    """--drop-caches: the kernel's page cache emptied (root only), so that the next side reads its files from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as exc:
        sys.exit(f"--drop-caches: cannot write /proc/sys/vm/drop_caches ({exc.strerror}): it needs root")


MODES = {  # name: (dtype, int8); "transformers" and the float64 reference are their own cases
    "float32": (torch.float32, False), "bfloat16": (torch.bfloat16, False), "int8": ("auto", True),
    "int8-cached": ("auto", True), "int8-weight-only": ("auto", True), "int8-integer": ("auto", True),
    "int8-fbgemm": ("auto", True), "int8-avx2": ("auto", True)}
DEFAULT_MODES = "float32,bfloat16,int8,int8-cached"
STREAMED_REFERENCE_BUDGET = "8GiB"  # float64 layer-streamed: one layer of OLMoE in float64 is 6.3 GiB as held


def bench_helpers():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_cpu

    return bench_cpu


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def prepare_mode(mode: str, directory: Path, cache_dir: str) -> None:
    """Before an int8 row's load: "int8" empties the prepared cache (its load then builds it); "int8-weight-only",
    "int8-integer", "int8-fbgemm" and "int8-avx2" take that path whatever the loader would choose."""
    if mode == "int8":
        args = read_config(directory)
        shutil.rmtree(PreparedCache(cache_dir, directory, resolve_dtype("auto")[0], args.num_layers).path, ignore_errors=True)
    if mode in ("int8-weight-only", "int8-integer", "int8-fbgemm", "int8-avx2"):
        os.environ[KERNEL_ENV] = mode.removeprefix("int8-")


def child_moee(directory: Path, mode: str, texts: list[str], batch1: int, reps: int, cache_dir: str) -> tuple[dict, dict]:
    """One moee-ref mode: timings, read floor inputs and FLOPs (as JSON), and its vectors and top-k sets."""
    bench_cpu = bench_helpers()
    dtype, int8 = MODES[mode]
    prepare_mode(mode, directory, cache_dir)
    start = time.perf_counter()
    embedder = MoEEmbedder.from_pretrained(directory, dtype=dtype, int8=int8, cache_dir=cache_dir)
    load_s = time.perf_counter() - start
    load_rss = peak_rss_gib()
    first_s = first_text_s(lambda t: embedder.features(t, OPTIONS, batch_size=len(t)), texts)
    feats, rate, b1_ms = timed(lambda t: embedder.features(t, OPTIONS, batch_size=len(t)), texts, batch1, reps)
    peak_rss = peak_rss_gib()  # of load and embedding, before the 1 GiB array of the bandwidth measurement
    bandwidth = bench_cpu.read_bandwidth(torch.ones(2**28))  # right after the batch-1 timings, which it bounds
    # Batch invariance: each of the first texts alone against its row of the batch of all.
    alone = [embedder.features([t], OPTIONS) for t in texts[:batch1]]
    invariance = min(float(cosines(np.concatenate([a.hs for a in alone]), feats.hs[:batch1]).min()),
                     float(cosines(np.concatenate([a.rw for a in alone]), feats.rw[:batch1]).min()))
    model, prefix = embedder.model, bench_cpu.shared_prefix_tokens(embedder)
    touched = statistics.mean(bench_cpu.batch1_bytes(model, embedder.tokenizer, t, prefix) / 4 for t in texts[:batch1])
    tokens = sum(bench_cpu.token_count(embedder.tokenizer, t) for t in texts)
    stats = {"weight_bytes": model_bytes(model), "load_s": load_s, "first_text_s": first_s, "load_peak_rss_gib": load_rss,
             "b32_texts_per_s": rate, "b1_ms": b1_ms, "alone_vs_batched_cos_min": invariance, "dtype": str(model.dtype).removeprefix("torch."),
             "b1_params_touched": touched, "bandwidth_gbs": bandwidth / 1e9,
             "b32_gflop": bench_cpu.flops_done(model.args, tokens, len(texts), prefix) / 1e9, "peak_rss_gib": peak_rss,
             "int8_kernel": getattr(model, "int8_kernel", None), "prepared": getattr(model, "prepared", None)}
    topk, mask = topk_sets(embedder, texts)
    return stats, {"hs": feats.hs, "rw": feats.rw, "topk": topk, "mask": mask}


def topk_sets(embedder: MoEEmbedder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted top-k expert ids [B, L_moe, T, k] of the texts as one batch (the texts themselves, no prompt),
    and the batch's attention mask [B, T]."""
    batch = embedder.tokenizer.encode_batch(texts)
    with torch.inference_mode():
        out = next(iter(embedder.model.run([(batch.input_ids, batch.attention_mask, None)])))
    return out.topk_ids.sort(-1).values.numpy(), batch.attention_mask.bool().numpy()


def interleaved_b1(directory: Path, modes: list[str], texts: list[str], reps: int, cache_dir: str) -> dict[str, float]:
    """Median ms per text at batch 1 of each mode, all loaded together and called in turn for every text."""
    embedders = {}
    for mode in modes:  # the int8 matmuls are chosen at load: each mode's setting holds for its own load
        prepare_mode(mode, directory, cache_dir)
        embedders[mode] = MoEEmbedder.from_pretrained(directory, dtype=MODES[mode][0], int8=MODES[mode][1], cache_dir=cache_dir)
        os.environ.pop(KERNEL_ENV, None)
    for embedder in embedders.values():  # warm-up: kernels built for these shapes
        for text in texts[:2]:
            embedder.features([text], OPTIONS)
    times = {mode: [] for mode in modes}
    for _ in range(reps):
        for text in texts:
            for mode, embedder in embedders.items():
                start = time.perf_counter()
                embedder.features([text], OPTIONS)
                times[mode].append(time.perf_counter() - start)
    return {mode: 1000 * statistics.median(t) for mode, t in times.items()}


def child_reference(directory: Path, texts: list[str]) -> tuple[dict, dict]:
    """float64 layer-streamed on a few texts: the reference where float32 does not fit resident."""
    embedder = MoEEmbedder.from_pretrained(directory, dtype=torch.float64, memory_budget=STREAMED_REFERENCE_BUDGET)
    feats = embedder.features(texts, OPTIONS, batch_size=len(texts))
    topk, mask = topk_sets(embedder, texts)
    return {"texts": len(texts)}, {"hs": feats.hs, "rw": feats.rw, "topk": topk, "mask": mask}


def child_transformers(directory: Path, texts: list[str], batch1: int, reps: int, dtype: torch.dtype) -> tuple[dict, dict]:
    bench_cpu = bench_helpers()
    from moee_ref.loading.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(directory)
    # transformers checks no memory: refused here, as moee-ref's loader refuses, rather than killed by the kernel
    stored = sum(f.stat().st_size for f in directory.glob("*.safetensors"))  # bf16 shards (ensure_checkpoint)
    need, (available, figure) = stored * dtype.itemsize // 2 + 2**30, memory_available()
    if need > available:
        raise InsufficientMemoryError(f"transformers in {str(dtype).removeprefix('torch.')} needs at least {format_bytes(need)} "
                                      f"(its weights and 1 GiB), more than the {format_bytes(available, up=False)} "
                                      f"this process may use ({figure})")
    bench_cpu.import_hf_classes(read_config(directory).family)  # imports are not load time
    start = time.perf_counter()
    # sdpa, what a user gets by default; gpt-oss's sinks have only transformers' eager attention
    attention = "eager" if read_config(directory).family == "gpt_oss" else "sdpa"
    model = bench_cpu.load_hf(directory, dtype, attn_implementation=attention)
    load_s = time.perf_counter() - start
    load_rss = peak_rss_gib()
    (hs, rw), rate, b1_ms = timed(lambda t: bench_cpu.hf_features(model, tokenizer, t), texts, batch1, reps)
    stats = {"weight_bytes": model_bytes(model), "load_s": load_s, "load_peak_rss_gib": load_rss,
             "b32_texts_per_s": rate, "b1_ms": b1_ms}
    return stats, {"hs": hs, "rw": rw}


def run_child(args, mode: str, out: Path) -> dict:
    """Run one mode in a fresh process; its stats, with its arrays from out (or "refused": the loader's reason).
    mode: a MODES name, "reference", or "transformers DTYPE"."""
    mode, _, hf_dtype = mode.partition(" ")
    if getattr(args, "drop_caches", False):
        drop_page_cache()
    command = [sys.executable, __file__, "--child", mode, "--child-out", str(out), "--family", args.family,
               *(["--hf-dtype", hf_dtype] if hf_dtype else []),
               "--layers", str(args.layers), "--texts", str(args.texts), "--batch1", str(args.batch1),
               "--reps", str(args.reps), "--workdir", args.workdir, "--reference-texts", str(args.reference_texts),
               "--cache-dir", cache_dir_of(args),
               *(["--dir", str(args.dir)] if getattr(args, "dir", None) else [])]
    return child_result(command, f"the {mode} process", out)


def cache_dir_of(args) -> str:
    return getattr(args, "cache_dir", None) or str(Path(args.workdir) / "prepared-cache")


def child_result(command: list[str], what: str, out: Path) -> dict:
    """Run a child that prints its stats as a JSON last line and saves its arrays in out; both, as one dict."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{what} failed (exit {done.returncode}; -9 is often the kernel's OOM killer):\n{done.stderr[-3000:]}")
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    if "refused" not in stats:
        with np.load(out) as arrays:
            stats.update({key: arrays[key] for key in arrays.files})
    return stats


def child_main(args, directory: Path) -> None:
    texts = prompts(args.texts)
    try:
        if args.child == "transformers":
            stats, arrays = child_transformers(directory, texts, args.batch1, args.reps, getattr(torch, args.hf_dtype))
        elif args.child == "reference":
            stats, arrays = child_reference(directory, texts[: args.reference_texts])
        else:
            stats, arrays = child_moee(directory, args.child, texts, args.batch1, args.reps, cache_dir_of(args))
    except InsufficientMemoryError as error:  # the loader refused the mode before reading weights (it does not fit)
        print(json.dumps({"refused": str(error).splitlines()[0]}))
        return
    stats.setdefault("peak_rss_gib", peak_rss_gib())
    np.savez(args.child_out, **arrays)
    print(json.dumps(stats))


def matmul_gflops(dtype: torch.dtype = torch.bfloat16, runs: int = 3) -> float:
    """The best F.linear rate in dtype of a few shapes (the issue's 512 x 2048 x 8192, MoE-expert and attention
    shapes); in float32 the best of plain and oneDNN-packed weights, as the float32 mode runs packed."""
    time_call = bench_helpers().time_call
    best = 0.0
    for m, k, n in ((512, 2048, 8192), (160, 2048, 2048), (512, 2048, 2048)):
        a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        calls = [lambda: torch.nn.functional.linear(a, w)]
        if dtype == torch.float32 and packing_available():
            packed = pack_weight(w)
            calls.append(lambda: linear(a, packed))
        for call in calls:
            call()
            inner = max(1, int(2e10 // (2 * m * k * n)))
            seconds = min(time_call(lambda: [call() for _ in range(inner)]) for _ in range(runs)) / inner
            best = max(best, 2 * m * k * n / seconds / 1e9)
    return best


def ensure_checkpoint(directory: Path, family: str, layers: int) -> Path:
    """The family's released config with `layers` layers, random bf16 weights, written once into directory."""
    if not (directory / "config.json").is_file():
        config = json.loads((CONFIGS / f"{family}.json").read_text())
        config["num_hidden_layers"] = layers
        config.pop("quantization_config", None)  # the random checkpoint is written unquantized (gpt-oss's MXFP4 is not)
        if "layer_types" in config:  # gpt-oss: one entry per layer
            config["layer_types"] = config["layer_types"][:layers]
        write_random_checkpoint(directory, config, dtype="bfloat16", max_shard_bytes=2**30)
    return directory


BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "int8": 1}  # int8: its row scales and full-precision router are ~1%


def mode_bytes(name: str) -> int:
    return BYTES_PER_PARAM[name.split()[0].split("-")[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="olmoe", choices=sorted(FAMILIES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--batch1", type=int, default=8, help="texts timed one at a time")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--reference-texts", type=int, default=8, help="texts the float64 streamed reference embeds")
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "moee-ref-bench"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers row")
    parser.add_argument("--interleave", default=None, help="comma-separated modes: batch 1 only, in turn, in one process")
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, of {', '.join(MODES)} (bfloat16 only where native)")
    parser.add_argument("--cache-dir", default=None, help="the int8 rows' prepared cache (default WORKDIR/prepared-cache)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="empty the kernel's page cache before each side (root only): every side reads its files from disk")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dtype", default="bfloat16", help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)  # a checkpoint elsewhere (bench_llamacpp.py's)
    args = parser.parse_args()

    directory = Path(args.dir) if args.dir else Path(args.workdir) / f"{args.family}-{args.layers}layers-bf16"
    if args.child:
        return child_main(args, directory)
    if not args.dir:
        ensure_checkpoint(directory, args.family, args.layers)
    if args.interleave:
        modes = args.interleave.split(",")
        if not set(modes) <= set(MODES):
            parser.error(f"--interleave takes {', '.join(MODES)}, not {args.interleave!r}")
        b1 = interleaved_b1(directory, modes, prompts(args.batch1), args.reps, cache_dir_of(args))
        print(f"{args.family}, {args.layers} layers, batch 1, {args.batch1} texts x {args.reps} in turn, "
              f"{torch.get_num_threads()} threads; auto dtype here: {str(resolve_dtype('auto')[0]).removeprefix('torch.')}")
        for mode, ms in b1.items():
            print(f"{mode:<10} {ms:7.1f} ms = {ms / b1[modes[0]]:.2f}x {modes[0]}'s time")
        return

    auto, reason = resolve_dtype("auto")
    native = auto == torch.bfloat16  # else bf16 is emulated here: its rows would time the emulation
    rate_name = "bf16" if native else "float32"
    matmul_rate = matmul_gflops(auto)
    names = args.modes.split(",")
    if not set(names) <= set(MODES):
        parser.error(f"--modes takes {', '.join(MODES)}, not {args.modes!r}")
    names = [name for name in names if native or name != "bfloat16"]
    names += [] if args.no_transformers else [f"transformers {str(auto).removeprefix('torch.')}"]  # in auto's dtype
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            results[name] = run_child(args, name, Path(scratch) / f"{name.split()[0]}.npz")
        if "float32" not in results:  # not asked for: speed only
            ref_name, ref = "nothing (no float32 row)", None
        elif "refused" in results["float32"]:
            ref_name, ref = "float64 streamed", run_child(args, "reference", Path(scratch) / "reference.npz")
        else:
            ref_name, ref = "float32", results["float32"]
    rows = len(ref["hs"]) if ref is not None else 0
    print(f"{args.family}, {args.layers} layers of the real dimensions, {args.texts} texts (random weights), "
          f"{torch.get_num_threads()} threads; auto dtype here: {str(auto)[6:]} ({reason}); "
          f"int8: {integer_reason(auto)}; "
          f"{rate_name} matmul rate {matmul_rate:.0f} GFLOP/s; "
          f"quality against {ref_name} on {rows} texts")
    header = (f"{'mode':<20} {'weights GiB':>11} {'load s':>7} {'peak RSS GiB':>12} {'b32 texts/s':>11} {f'b32 % {rate_name} rate':>15} "
              f"{'b1 ms':>7} {'b1 floor ms':>11} {'b1 / floor':>10} {'cos HS min':>10} {'cos RW min':>10} "
              f"{'top-k changed':>13} {'alone vs batched':>16}")
    print(header)
    summary = {"family": args.family, "layers": args.layers, "texts": args.texts, "auto": str(auto), "auto_reason": reason,
               "matmul_dtype": rate_name, "matmul_gflops": matmul_rate, "reference": ref_name, "reference_texts": rows, "modes": {}}
    for name, r in results.items():
        if "refused" in r:
            print(f"{name:<20} refused by the loader: {r['refused']}")
            summary["modes"][name] = {"refused": r["refused"]}
            continue
        if ref is None:
            cos_hs = cos_rw = np.array([float("nan")])
        else:
            cos_hs, cos_rw = cosines(ref["hs"], r["hs"][:rows]), cosines(ref["rw"], r["rw"][:rows])
        changed = float("nan")
        if "topk" in r and ref is not None:
            # Left-padded batches: a text's tokens are its row's last positions, whatever the batch's width.
            width = min(ref["topk"].shape[2], r["topk"].shape[2])
            ref_topk, topk, real = ref["topk"][..., -width:, :], r["topk"][:rows, :, -width:], ref["mask"][:, -width:]
            differs = (ref_topk != topk).any(-1)  # [rows, L_moe, width]
            changed = float(differs[np.broadcast_to(real[:, None, :], differs.shape)].mean())
        floor_ms = 1e3 * r["b1_params_touched"] * mode_bytes(name) / (r["bandwidth_gbs"] * 1e9) if "bandwidth_gbs" in r else float("nan")
        share = r["b32_gflop"] * r["b32_texts_per_s"] / args.texts / matmul_rate if "b32_gflop" in r else float("nan")
        print(f"{name:<20} {r['weight_bytes'] / 2**30:>11.2f} {r['load_s']:>7.1f} {r['peak_rss_gib']:>12.2f} "
              f"{r['b32_texts_per_s']:>11.2f} {100 * share:>14.0f}% {r['b1_ms']:>7.1f} {floor_ms:>11.1f} {r['b1_ms'] / floor_ms:>10.2f} "
              f"{cos_hs.min():>10.5f} {cos_rw.min():>10.5f} {100 * changed:>12.2f}% {r.get('alone_vs_batched_cos_min', float('nan')):>16.6f}")
        summary["modes"][name] = {k: v for k, v in r.items() if not isinstance(v, np.ndarray)} | {
            "cos_hs_min": float(cos_hs.min()), "cos_rw_min": float(cos_rw.min()), "topk_sets_changed": changed,
            "b1_floor_ms": floor_ms, "b32_share_of_matmul_rate": share}
    for name, r in results.items():
        if r.get("int8_kernel"):
            print(f"{name}: {r['int8_kernel']}; prepared cache {r['prepared']}")
    print(ratios(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


def ratios(summary: dict) -> str:
    """The issue's ratios, where both sides ran."""
    modes = summary["modes"]
    ok = {name: m for name, m in modes.items() if "refused" not in m}
    lines = []
    hf_name = next((name for name in ok if name.startswith("transformers")), None)
    hf = ok.get(hf_name)
    for name in (hf_name.split()[-1], "int8") if hf else ():  # the mode of transformers' dtype, and int8
        if name in ok:
            m = ok[name]
            lines.append(f"{name} against {hf_name}: b32 {m['b32_texts_per_s'] / hf['b32_texts_per_s']:.2f}x its rate, "
                         f"b1 {m['b1_ms'] / hf['b1_ms']:.2f}x its time, load {m['load_s'] / hf['load_s']:.2f}x its time")
    if "bfloat16" in ok and "int8" in ok:
        b, i = ok["bfloat16"], ok["int8"]
        lines.append(f"int8 against bfloat16: b1 {i['b1_ms'] / b['b1_ms']:.2f}x its time, load {i['load_s'] / b['load_s']:.2f}x")
    for name in ("int8", "int8-cached", "int8-weight-only", "int8-integer", "int8-fbgemm", "int8-avx2"):
        if "float32" in ok and name in ok:
            lines.append(f"{name} against float32: b1 {ok[name]['b1_ms'] / ok['float32']['b1_ms']:.2f}x its time, "
                         f"b32 {ok[name]['b32_texts_per_s'] / ok['float32']['b32_texts_per_s']:.2f}x its rate")
    if "int8" in ok and "int8-cached" in ok:
        lines.append(f"int8 load from the prepared cache: {ok['int8-cached']['load_s'] / ok['int8']['load_s']:.2f}x the quantizing load's time")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
