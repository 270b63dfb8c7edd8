"""Layer-streamed embedding of a DeepSeekMoE-16B-sized checkpoint under a memory budget.

Writes a random checkpoint with DeepSeekMoE-16B's real dimensions (bf16
shards, written tensor by tensor and shard by shard), embeds PromptEOL
prompts in the layer-streamed mode under a memory budget, and prints peak
RSS, time, checkpoint bytes read and the time the arithmetic alone would take
at the matmul rate measured on this machine. Optionally also the resident
mode with int8 weights, when it fits in memory.

    python bench/bench_stream.py                       # all 28 layers, 256 prompts, 8GB budget
    python bench/bench_stream.py --layers 2 --prompts 16 --int8-resident   # quick check

Each measured mode runs in a child process of its own, so its peak RSS is its
own. The shards are evicted from the page cache before each mode, so the
weights really come from the disk (--keep-cache to skip that). With fewer
than 28 layers (asked for, or all the disk has room for), time and bytes read
are also extrapolated to the full 28 layers. Targets (streamed mode): peak
RSS <= budget + 1 GiB; total time <= 1.5 x arithmetic time (meant for 256 prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "tests" / "fixtures" / "configs" / "deepseek.json"
FULL_LAYERS = 28
MIN_LAYERS = 2  # layer 0 is dense; at least one MoE layer is needed
SHARD_BYTES = 2**30  # the writer holds one shard in memory before saving it: keep that modest
GiB = 2**30
BATCH_SIZE = 32
RSS_SLACK, TIME_FACTOR = GiB, 1.5
WORDS = (
    "the a river city quiet morning engineer builds small bridge over old road while children watch from "
    "window train leaves station early every day market sells fresh bread cheese apples and warm coffee "
    "scientist measures light distant stars with careful patience storm arrives late evening rain falls "
    "on roofs gardens teacher explains simple idea clear words students write notes music plays softly "
    "library keeps thousands books about history mountains oceans machines languages people"
).split()


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def config_dict(layers: int) -> dict:
    config = json.loads(CONFIG.read_text())
    config["num_hidden_layers"] = layers
    return config


def model_args(layers: int):
    from moee_ref.families import parse_config

    return parse_config(config_dict(layers), f"DeepSeekMoE-16B config with {layers} layers")


def sizes(layers: int) -> dict:
    """Parameter counts and bf16 byte counts of the checkpoint with `layers` decoder layers."""
    args = model_args(layers)
    total, active = args.parameter_counts()
    outside = 2 * args.vocab_size * args.hidden_size + args.hidden_size  # embedding, LM head, final norm
    routed = len(args.moe_layers) * args.top_k * 3 * args.hidden_size * args.expert_size  # per token
    return {"total": total, "active": active, "active_no_embed": active - outside, "active_routed": routed,
            "checkpoint_bytes": 2 * total, "streamed_bytes": 2 * (total - args.vocab_size * args.hidden_size)}


def disk_needed(layers: int) -> int:
    return int(sizes(layers)["checkpoint_bytes"] * 1.02) + GiB  # the tokenizer, config and the file system's own share


def fitting_layers(wanted: int, free: int) -> int:
    """The most layers (at most wanted, at least MIN_LAYERS) whose checkpoint fits in `free` bytes; 0 if none."""
    return max((n for n in range(MIN_LAYERS, wanted + 1) if disk_needed(n) <= free), default=0)


def checkpoint_complete(directory: Path, layers: int) -> bool:
    from moee_ref.loading.checkpoint import ShardReader, expected_shapes, name_map_groups, shard_files

    try:
        written = json.loads((directory / "config.json").read_text())
        if {**written, "torch_dtype": None} != {**config_dict(layers), "torch_dtype": None}:
            return False
        if not (directory / "tokenizer.json").is_file():
            return False
        ShardReader(shard_files(directory)).check(expected_shapes(name_map_groups(model_args(layers))))
        return True
    except Exception:
        return False


def int8_estimate(layers: int) -> tuple[int, int]:
    """(bytes held by the resident int8 model, estimated peak while loading it), from the tensor shapes."""
    import math

    from moee_ref.loading.checkpoint import name_map_groups
    from moee_ref.families.names import leaves

    groups = name_map_groups(model_args(layers))
    groups[-1] = {k: v for k, v in groups[-1].items() if k != "lm_head.weight"}
    resident, layer_float, largest = 0, 0, 0
    for index, group in enumerate(groups):
        float_bytes = 0
        for name, recipe in group.items():
            shapes = [leaf.shape for leaf in leaves(recipe)]
            count = sum(math.prod(s) for s in shapes)
            quantized = 0 < index < len(groups) - 1 and not name.endswith(("norm.weight", "router.weight", ".bias"))
            resident += count + 4 * (count // shapes[0][-1]) if quantized else 4 * count  # int8 values + fp32 row scales
            float_bytes += 4 * count
            largest = max(largest, 4 * count if quantized else 0)
        layer_float = max(layer_float, float_bytes if 0 < index < len(groups) - 1 else 0)
    # Loading builds a layer in float, then quantizes it: its largest matrix gets two float temporaries.
    return resident, resident + layer_float + 2 * largest + GiB  # + the runtime and malloc fragmentation


def proc_bytes(path: str, key: str) -> int:
    """A 'Key:  N kB' field of a /proc file, in bytes."""
    return next(int(l.split()[1]) * 1024 for l in Path(path).read_text().splitlines() if l.startswith(key + ":"))


def evict_page_cache(directory: Path) -> None:
    """Drop the shards from the page cache (they were just written, or read by the last mode)."""
    for file in directory.glob("*.safetensors"):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())  # dirty pages cannot be dropped
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


# --------------------------------------------------------------------------- child side


def peak_rss() -> dict:
    return {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "vm_hwm": proc_bytes("/proc/self/status", "VmHWM")}


def make_prompts(tokenizer, count: int) -> tuple[list[str], list[int]]:
    """Deterministic texts whose PromptEOL prompts are 20-60 tokens long (BOS included)."""
    from moee_ref.embedding.prompts import apply_prompt, resolve_prompt

    template = resolve_prompt("prompteol")
    length = lambda words: len(tokenizer.tokenize([apply_prompt(template, " ".join(words) + ".")])[0][0])
    texts, lengths = [], []
    for i in range(count):
        rng = random.Random(i)
        target, words = rng.randint(20, 60), [rng.choice(WORDS).capitalize()]
        while length(words) < target:
            words.append(rng.choice(WORDS))
        if length(words) > 60:
            words.pop()
        texts.append(" ".join(words) + ".")
        lengths.append(length(words))
        assert 20 <= lengths[-1] <= 60, lengths[-1]
    return texts, lengths


def matmul_gflops(m: int, k: int, n: int, rounds: int = 5, seconds: float = 0.3) -> float:
    """Best fp32 rate over a few rounds of x [m, k] @ w[n, k].T, the layout of the model's weights, through
    torch.mm (MKL) and, where torch has oneDNN, through the packed-weight oneDNN path moee-ref itself uses.

    The best round and path, not the median: the arithmetic time is what the machine can do, and a busy machine
    mostly slows rounds down.
    """
    import torch

    from moee_ref.kernels.onednn import linear, pack_weight, packing_available

    x, w = torch.randn(m, k), torch.randn(n, k)
    calls = [lambda: torch.mm(x, w.t())]
    if packing_available():
        packed = pack_weight(w)
        calls.append(lambda: linear(x, packed))
    rates = []
    for call in calls:
        for _ in range(3):
            call()
        for _ in range(rounds):
            reps, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                call()
                reps += 1
            rates.append(2 * m * k * n * reps / elapsed / 1e9)
    return max(rates)


def child(opts) -> dict:
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    directory = Path(opts.workdir)
    if opts.child == "write":
        from moee_ref.demo.checkpoints import write_random_checkpoint

        start = time.perf_counter()
        write_random_checkpoint(directory, config_dict(opts.layers), dtype="bfloat16", seed=0, max_shard_bytes=SHARD_BYTES)
        on_disk = sum(f.stat().st_size for f in directory.iterdir())
        return {"seconds": time.perf_counter() - start, "bytes_on_disk": on_disk, **peak_rss()}

    from moee_ref import MoEEmbedder, Tokenizer
    from moee_ref.embedding.embedder import FeatureOptions

    args = model_args(opts.layers)
    texts, lengths = make_prompts(Tokenizer.from_dir(directory), opts.prompts)
    ordered = sorted(lengths, reverse=True)  # batched as features() batches them: longest first
    shapes = [(len(b), b[0]) for b in (ordered[i : i + BATCH_SIZE] for i in range(0, len(ordered), BATCH_SIZE))]
    rows = max(1, round(sum(b * t for b, t in shapes) / len(shapes) * args.top_k / args.num_experts))
    result = {"real_tokens": sum(lengths), "batches": shapes, "expert_rows": rows}

    start = time.perf_counter()
    if opts.child == "streamed":
        embedder = MoEEmbedder.from_pretrained(directory, memory_budget=opts.budget)
        result["memory_plan"] = embedder.model.memory_plan(shapes)
    else:
        embedder = MoEEmbedder.from_pretrained(directory, int8=True)
        result["rss_after_load"] = proc_bytes("/proc/self/status", "VmRSS")
    result["load_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    feats = embedder.features(texts, FeatureOptions(prompt="prompteol"), batch_size=BATCH_SIZE)
    result["encode_seconds"] = time.perf_counter() - start
    assert feats.hs.shape == (len(texts), args.hidden_size) and bool((feats.hs != 0).any())
    # Measured last: allocating and freeing the probe's matrices first would change how malloc serves the run.
    d = args.hidden_size
    result["gflops"] = {"expert": matmul_gflops(rows, d, 2 * args.expert_size), "square": matmul_gflops(d, d, d)}
    if opts.child == "streamed":
        stats = embedder.model.stats
        result.update(bytes_read=stats.weight_bytes_read, spilled=stats.spilled, activation_bytes=stats.activation_bytes,
                      layer_bytes_max=stats.layer_bytes_max)
    return {**result, **peak_rss()}


# --------------------------------------------------------------------------- parent side


def run_child(mode: str, opts, directory: Path, layers: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "result.json")
        subprocess.run([sys.executable, __file__, "--child", mode, "--workdir", str(directory), "--layers", str(layers),
                        "--prompts", str(opts.prompts), "--budget", opts.budget, "--json", out]
                       + (["--threads", str(opts.threads)] if opts.threads else []), check=True)
        return json.loads(Path(out).read_text())


def measured_row(name: str, r: dict, layers: int, budget: int | None, streamed: bool) -> dict:
    arithmetic = 2 * sizes(layers)["active_no_embed"] * r["real_tokens"] / (r["gflops"]["expert"] * 1e9)
    seconds = r["load_seconds"] + r["encode_seconds"] if streamed else r["encode_seconds"]
    read = r["bytes_read"] if streamed else sizes(layers)["streamed_bytes"]  # resident: what the load reads
    # A second view: the routed experts at the expert-shaped rate, the rest (attention, shared experts, the dense layer,
    # all run on every token of a batch at once) at the square rate.
    routed, rest = sizes(layers)["active_routed"], sizes(layers)["active_no_embed"] - sizes(layers)["active_routed"]
    mixed = 2 * r["real_tokens"] * (routed / r["gflops"]["expert"] + rest / r["gflops"]["square"]) / 1e9
    row = {"mode": name, "peak_rss": r["ru_maxrss"], "vm_hwm": r["vm_hwm"], "budget": budget, "load": r["load_seconds"],
           "time": seconds, "bytes_read": read, "arithmetic": arithmetic, "ratio": seconds / arithmetic,
           "arithmetic_mixed": mixed, "ratio_mixed": seconds / mixed, "gflops": r["gflops"]}
    if streamed:
        row["rss_ok"] = max(r["ru_maxrss"], r["vm_hwm"]) <= budget + RSS_SLACK
        row["time_ok"] = row["ratio"] <= TIME_FACTOR
    return row


def extrapolated(row: dict, layers: int) -> dict:
    """Times scaled by the arithmetic of 28 layers over that of `layers`; bytes read and resident loading by the weight bytes."""
    time_scale = sizes(FULL_LAYERS)["active_no_embed"] / sizes(layers)["active_no_embed"]
    byte_scale = sizes(FULL_LAYERS)["streamed_bytes"] / sizes(layers)["streamed_bytes"]
    resident = row["budget"] is None  # its peak grows with the layers: the estimate from the shapes instead
    return {**row, "mode": row["mode"] + f" [{FULL_LAYERS}L extrapolated]", "time": row["time"] * time_scale,
            "load": row["load"] * (byte_scale if resident else 1), "arithmetic": row["arithmetic"] * time_scale,
            "arithmetic_mixed": row["arithmetic_mixed"] * time_scale,
            "bytes_read": row["bytes_read"] * byte_scale, "extrapolated": True,
            **({"peak_rss": int8_estimate(FULL_LAYERS)[1], "vm_hwm": None} if resident else {})}


def print_table(rows: list[dict]) -> None:
    head = ["mode", "peak RSS (maxrss/HWM)", "budget", "load", "time", "bytes read", "arithmetic time", "ratio", "targets met?"]
    lines = []
    for r in rows:
        if "does_not_fit" in r:
            lines.append([r["mode"], f"needs ~{gib(r['estimated_peak'])}", "-", "-", "-", "-", "-", "-",
                          f"does not fit ({gib(r['available'])} available)"])
            continue
        targets = "-" if "rss_ok" not in r else (
            f"RSS {'yes' if r['rss_ok'] else 'NO'}, time {'yes' if r['time_ok'] else 'NO'}")
        rss = f"~{gib(r['peak_rss'])} (estimate)" if r["vm_hwm"] is None else f"{gib(r['peak_rss'])} / {gib(r['vm_hwm'])}"
        lines.append([r["mode"], rss, gib(r["budget"]) if r["budget"] else "-",
                      f"{r['load']:.1f} s", f"{r['time']:.1f} s", gib(r["bytes_read"]), f"{r['arithmetic']:.1f} s",
                      f"{r['ratio']:.2f}", targets])
    widths = [max(len(str(x)) for x in column) for column in zip(head, *lines)]
    for line in [head, ["-" * w for w in widths], *lines]:
        print(" | ".join(str(x).ljust(w) for x, w in zip(line, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help=f"decoder layers ({MIN_LAYERS}-{FULL_LAYERS})")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--budget", default="8GB", help="memory budget of the streamed mode")
    parser.add_argument("--workdir", help="checkpoint directory (default ~/.cache/moee-ref-bench/deepseek-<layers>L)")
    parser.add_argument("--int8-resident", action="store_true", help="also run the resident mode with int8 weights")
    parser.add_argument("--threads", type=int, help="torch threads in each measured process (default: torch's)")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--keep-cache", action="store_true", help="do not evict the shards from the page cache")
    parser.add_argument("--dry-run", action="store_true", help="only print the plan: layers, disk room, directory")
    parser.add_argument("--child", choices=["write", "streamed", "int8-resident"], help=argparse.SUPPRESS)
    parser.add_argument("--pretend-free-bytes", type=int, help=argparse.SUPPRESS)  # tests the disk-room logic
    opts = parser.parse_args()
    if opts.child:
        Path(opts.json).write_text(json.dumps(child(opts)))
        return
    from moee_ref.loading.streamed import parse_bytes

    if not MIN_LAYERS <= opts.layers <= FULL_LAYERS:
        parser.error(f"--layers must lie in [{MIN_LAYERS}, {FULL_LAYERS}]")
    budget, layers = parse_bytes(opts.budget), opts.layers
    default_dir = lambda n: Path("~/.cache/moee-ref-bench").expanduser() / f"deepseek-{n}L"
    directory = Path(opts.workdir).expanduser() if opts.workdir else default_dir(layers)
    report: dict = {"requested_layers": layers, "prompts": opts.prompts, "budget": budget, "shard_bytes": SHARD_BYTES}
    reuse = checkpoint_complete(directory, layers)
    if not reuse:
        probe = next(p for p in [directory, *directory.parents] if p.exists())
        free = opts.pretend_free_bytes if opts.pretend_free_bytes is not None else shutil.disk_usage(probe).free
        fit = fitting_layers(layers, free)
        report.update(disk_free=free, disk_needed=disk_needed(layers))
        if fit == 0:
            sys.exit(f"not enough disk in {probe}: {gib(free)} free, even {MIN_LAYERS} layers need {gib(disk_needed(MIN_LAYERS))}")
        if fit < layers:
            print("!" * 78 + f"\n!! NOT ENOUGH DISK for {layers} layers in {probe}: {gib(free)} free, {gib(disk_needed(layers))} "
                  f"needed.\n!! Using {fit} layers ({gib(disk_needed(fit))}); time and bytes read for {FULL_LAYERS} layers "
                  "are EXTRAPOLATED.\n" + "!" * 78, flush=True)
            layers = fit
            if not opts.workdir:
                directory = default_dir(layers)
            reuse = checkpoint_complete(directory, layers)
    if not reuse and directory.exists():
        sys.exit(f"{directory} exists but is not a complete {layers}-layer checkpoint; remove it or choose --workdir")
    report.update(layers=layers, workdir=str(directory), reused=reuse)
    print(f"checkpoint: {directory} ({layers} of {FULL_LAYERS} layers, bf16, {gib(sizes(layers)['checkpoint_bytes'])}, "
          f"{'reused' if reuse else 'to be written'})", flush=True)
    if opts.dry_run:
        print(json.dumps(report, indent=2))
        return
    if not reuse:
        print(f"writing it shard by shard ({gib(SHARD_BYTES)} shards) ...", flush=True)
        writer = run_child("write", opts, directory, layers)
        report["writer"] = writer
        print(f"written in {writer['seconds']:.0f} s, {gib(writer['bytes_on_disk'])} on disk; "
              f"writer peak RSS {gib(writer['ru_maxrss'])} (VmHWM {gib(writer['vm_hwm'])})", flush=True)

    rows, children = [], {}
    modes = ["streamed"] + (["int8-resident"] if opts.int8_resident else [])
    for mode in modes:
        if mode == "int8-resident":
            resident, peak = int8_estimate(layers)
            available = proc_bytes("/proc/meminfo", "MemAvailable")
            report["int8_estimate"] = {"resident": resident, "peak": peak, "available": available}
            if peak > available - GiB:
                print(f"int8-resident: does not fit: the int8 model holds ~{gib(resident)} and loading it peaks at "
                      f"~{gib(peak)}; {gib(available)} available (1 GiB kept free)", flush=True)
                rows.append({"mode": mode, "does_not_fit": True, "estimated_peak": peak, "available": available})
                continue
        if not opts.keep_cache:
            evict_page_cache(directory)
        print(f"running {mode} ({opts.prompts} prompts) ...", flush=True)
        children[mode] = result = run_child(mode, opts, directory, layers)
        rows.append(measured_row(mode, result, layers, budget if mode == "streamed" else None, mode == "streamed"))
        if layers < FULL_LAYERS:
            rows.append(extrapolated(rows[-1], layers))
    report.update(children=children, rows=rows)

    first, args = children["streamed"], model_args(layers)
    print(f"\nmatmul rates (fp32, best of 5 rounds, measured in each mode's process after its run): expert-shaped "
          f"[{first['expert_rows']} x {args.hidden_size}] x [{args.hidden_size} x {2 * args.expert_size}], square 2048^3")
    for row in (r for r in rows if "gflops" in r and not r.get("extrapolated")):
        print(f"  {row['mode']}: {row['gflops']['expert']:.1f} and {row['gflops']['square']:.1f} GFLOP/s; arithmetic time "
              f"{row['arithmetic']:.1f} s at the expert-shaped rate (used below), {row['arithmetic_mixed']:.1f} s with the "
              f"square rate for the non-expert matmuls (ratio {row['ratio_mixed']:.2f})")
    print(f"corpus: {opts.prompts} PromptEOL prompts, {first['real_tokens']} real tokens; arithmetic = 2 x active parameters "
          f"without embedding/LM head ({sizes(layers)['active_no_embed'] / 1e9:.2f} B) per real token")
    plan = first["memory_plan"]
    print(f"streamed plan: weights {gib(plan['weights'])}, batch working memory {gib(plan['working'])}, smallest budget "
          f"{gib(plan['smallest'])}; activations {gib(first['activation_bytes'])} ({'spilled' if first['spilled'] else 'in memory'})")
    if "int8-resident" in children:
        estimate = report["int8_estimate"]
        print(f"int8-resident: RSS after load {gib(children['int8-resident']['rss_after_load'])} (weights "
              f"{gib(estimate['resident'])}); peak estimated beforehand {gib(estimate['peak'])}")
    print()
    print_table(rows)
    if layers < FULL_LAYERS:
        resident, peak = int8_estimate(FULL_LAYERS)
        print(f"[{FULL_LAYERS}L extrapolated]: measured on {layers} layers; time scaled by the arithmetic of {FULL_LAYERS} "
              "layers, bytes read and int8 loading by the weight bytes; ratio and streamed peak RSS as measured, int8 peak estimated")
        if layers < 10:
            print("  the streamed peak RSS creeps up layer after layer (see bench/README.md): here it understates "
                  "the full model's" + (", all the more with 2 layers, where no two MoE layers are held at once" if layers < 3 else ""))
        print(f"{FULL_LAYERS}L int8-resident estimate: {gib(resident)} of weights, ~{gib(peak)} peak while loading")
    print(f"targets (streamed): peak RSS <= budget + 1 GiB; time <= {TIME_FACTOR} x arithmetic "
          f"(meant for 256 prompts{'' if opts.prompts == 256 else f'; this run has {opts.prompts}'})")
    command = ["python", "bench/bench_stream.py", "--layers", str(opts.layers), "--prompts", str(opts.prompts), "--budget", opts.budget]
    command += (["--workdir", opts.workdir] if opts.workdir else []) + (["--int8-resident"] if opts.int8_resident else [])
    command += (["--threads", str(opts.threads)] if opts.threads else []) + (["--keep-cache"] if opts.keep_cache else [])
    print("reproduce: " + " ".join(command))
    report["command"] = " ".join(command)
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
