#!/usr/bin/env python
"""llama.cpp (through llama-cpp-python) against moee-ref on one checkpoint: batch 32, batch 1, load, HS parity.

    python bench/bench_llamacpp.py --llama-cpp DIR                          # OLMoE dimensions, 2 layers
    python bench/bench_llamacpp.py --llama-cpp DIR --layers 16 --types bf16,q8_0

llama.cpp is what a user who only wants fast CPU inference picks. It returns no
router weights through its API, so what is compared is speed and HS (its
last-token pooling of the final norm's output, the vector moee-ref's HS is).

Needs two things this project does not depend on: llama-cpp-python (pip builds
it from its sdist, about 18 minutes on 2 cores) and llama.cpp's own converter,
convert_hf_to_gguf.py beside its gguf-py package. The sdist carries both in
vendor/llama.cpp; --llama-cpp names that directory.

The checkpoint is bench_precision.py's (random bf16 weights with the family's
real dimensions) with a real tokenizer beside it (--tokenizer, by default
OLMoE's from ../shared/tokenizers), since llama.cpp's converter recognises a
tokenizer by its pre-tokenizer and refuses a synthetic one. It converts once,
into that directory, a GGUF file per --types entry. Every row runs in a process
of its own, one after the other. llama.cpp runs with an f32 KV cache, so its
f32 row checks parity (its HS against moee-ref float32). A type whose GGUF is
larger than the memory available is left out with a note.

Load is the constructor's time. llama.cpp maps its file and reads the weights
as the first texts use them, while moee-ref reads and checksums its prepared
cache before it returns, so "load + first text" (the first text embedded right
after the load) is the time to the first vector for both. --drop-caches empties
the kernel's page cache before each side (root only), so that both read from disk.

--no-extra-buffers loads without ggml's extra buffer types (its weight
repacking and its AMX int8 path): on one Intel Xeon with AMX, llama-cpp-python
0.3.36's q8_0 crashed in ggml_backend_amx_mul_mat (a segfault) with them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import moee_ref  # noqa: F401  first, before torch: its OpenMP wait setting applies (moee_ref/threads_wait.py)
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_precision  # noqa: E402
from bench_cpu import with_tokenizer  # noqa: E402

from moee_ref.embedding.prompts import apply_prompt, resolve_prompt  # noqa: E402
from moee_ref.loading.memory import memory_available  # noqa: E402

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "olmoe-tokenizer.json"
# What the released checkpoint's tokenizer_config.json says of its special tokens, for a bare tokenizer.json.
TOKENIZER_CONFIGS = {"olmoe-tokenizer": {"pad_token": "<|padding|>", "eos_token": "<|endoftext|>", "add_bos_token": False}}
GGUF_TYPES = ("f32", "bf16", "q8_0")  # llama.cpp's converter writes these itself (--outtype)
GGUF_SIZE = {"f32": 2.0, "bf16": 1.0, "q8_0": 34 / 64}  # of the bf16 checkpoint's bytes (q8_0: 34 bytes a block of 32)


def gguf_file(directory: Path, kind: str) -> Path:
    return directory / f"model-{kind}.gguf"


def convert(directory: Path, kind: str, llama_cpp: Path) -> Path:
    """GGUF of the checkpoint in `kind`, written once by llama.cpp's converter (to a temporary name first)."""
    target = gguf_file(directory, kind)
    if target.is_file():
        return target
    partial = target.with_suffix(".partial")
    command = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(directory), "--outtype", kind, "--outfile", str(partial)]
    env = {"PYTHONPATH": str(llama_cpp / "gguf-py"), "PATH": "/usr/bin:/bin"}
    print(f"converting to {target.name} with llama.cpp's converter (once) ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        partial.unlink(missing_ok=True)
        sys.exit(f"llama.cpp's converter failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    partial.rename(target)
    return target


def without_extra_buffers(llama_cpp) -> None:
    """Make llama-cpp-python load models with use_extra_bufts off (its Llama() has no argument for it)."""
    module = llama_cpp.llama.llama_cpp
    defaults = module.llama_model_default_params

    def params():
        chosen = defaults()
        chosen.use_extra_bufts = False
        return chosen

    module.llama_model_default_params = params


def child_llama(gguf: Path, texts: list[str], batch1: int, reps: int, out: Path, extra_buffers: bool) -> dict:
    """Load the GGUF (timed), embed the texts at batch len(texts) and one at a time, save HS."""
    import llama_cpp
    import llama_cpp.llama

    if not extra_buffers:
        without_extra_buffers(llama_cpp)

    prompted = [apply_prompt(resolve_prompt(bench_precision.OPTIONS.prompt), t) for t in texts]
    start = time.perf_counter()
    model = llama_cpp.Llama(
        model_path=str(gguf), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST, n_ctx=4096,
        n_batch=4096, n_ubatch=4096, n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(),
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    load_s = time.perf_counter() - start
    load_rss = bench_precision.peak_rss_gib()
    first_s = bench_precision.first_text_s(lambda batch: model.embed(batch), prompted)
    tokens = [len(model.tokenize(p.encode())) for p in prompted]
    hs, rate, b1_ms = bench_precision.timed(lambda batch: np.asarray(model.embed(batch), dtype=np.float32), prompted, batch1, reps)
    np.savez(out, hs=hs)
    return {"load_s": load_s, "first_text_s": first_s, "load_peak_rss_gib": load_rss, "b32_texts_per_s": rate, "b1_ms": b1_ms,
            "tokens": tokens, "gguf_bytes": gguf.stat().st_size,
            "peak_rss_gib": bench_precision.peak_rss_gib()}


def run_llama(args, gguf: Path, out: Path) -> dict:
    if args.drop_caches:
        bench_precision.drop_page_cache()
    command = [sys.executable, __file__, "--child", str(gguf), "--child-out", str(out), "--texts", str(args.texts),
               "--batch1", str(args.batch1), "--reps", str(args.reps), *(["--no-extra-buffers"] if args.no_extra_buffers else [])]
    return bench_precision.child_result(command, f"the llama.cpp process for {gguf.name}", out)


def tokenizer_dir(path: Path, workdir: Path) -> Path:
    """A directory with the tokenizer.json `path` is or holds (with_tokenizer's argument)."""
    if path.is_dir():
        return path
    if not path.is_file():
        sys.exit(f"--tokenizer {path}: no such file; pass a tokenizer.json or a directory with one (a real model's)")
    staged = workdir / f"tokenizer-{path.stem}"
    staged.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, staged / "tokenizer.json")
    if path.stem not in TOKENIZER_CONFIGS:
        sys.exit(f"--tokenizer {path}: a bare tokenizer.json names no pad and end tokens; pass the directory of a model's "
                 "tokenizer files (tokenizer.json and tokenizer_config.json) instead")
    (staged / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIGS[path.stem]))
    return staged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", default=None, help="llama.cpp's source directory (convert_hf_to_gguf.py and gguf-py)")
    parser.add_argument("--family", default="olmoe", help="a family llama.cpp converts (default olmoe)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--types", default=",".join(GGUF_TYPES), help=f"GGUF types, of {', '.join(GGUF_TYPES)}")
    parser.add_argument("--moee-modes", default="float32,bfloat16,int8", help="moee-ref modes beside them")
    parser.add_argument("--tokenizer", default=str(SHARED_TOKENIZER), help="a real tokenizer.json (or its directory)")
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--batch1", type=int, default=8, help="texts timed one at a time")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "moee-ref-bench"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-extra-buffers", action="store_true", help="load without ggml's repacking and AMX int8 path")
    parser.add_argument("--cache-dir", default=None, help="moee-ref int8's prepared cache (default WORKDIR/prepared-cache)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="empty the kernel's page cache before each side (root only): every side reads its files from disk")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    texts = bench_precision.prompts(args.texts)
    if args.child:
        print(json.dumps(child_llama(Path(args.child), texts, args.batch1, args.reps, Path(args.child_out), not args.no_extra_buffers)))
        return

    try:
        import llama_cpp
    except ImportError:
        sys.exit("bench_llamacpp.py needs llama-cpp-python (pip install llama-cpp-python: pip builds it from source)")
    if args.llama_cpp is None or not (Path(args.llama_cpp) / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"--llama-cpp {args.llama_cpp}: pass llama.cpp's source directory, the one with convert_hf_to_gguf.py "
                 "and gguf-py (vendor/llama.cpp in llama-cpp-python's sdist)")
    kinds = args.types.split(",")
    if not set(kinds) <= set(GGUF_TYPES):
        parser.error(f"--types takes {', '.join(GGUF_TYPES)}, not {args.types!r}")
    modes = args.moee_modes.split(",") if args.moee_modes else []
    if not set(modes) <= set(bench_precision.MODES):
        parser.error(f"--moee-modes takes {', '.join(bench_precision.MODES)}, not {args.moee_modes!r}")

    workdir = Path(args.workdir)
    plain = bench_precision.ensure_checkpoint(workdir / f"{args.family}-{args.layers}layers-bf16", args.family, args.layers)
    directory = with_tokenizer(plain, tokenizer_dir(Path(args.tokenizer), workdir))
    available, source = memory_available()
    results, left_out = {}, []
    child_args = SimpleNamespace(family=args.family, layers=args.layers, texts=args.texts, batch1=args.batch1,
                                 reps=args.reps, workdir=args.workdir, reference_texts=args.texts, dir=str(directory),
                                 cache_dir=args.cache_dir, drop_caches=args.drop_caches)
    with tempfile.TemporaryDirectory() as scratch:
        for mode in modes:
            results[f"moee-ref {mode}"] = bench_precision.run_child(child_args, mode, Path(scratch) / f"{mode}.npz")
        stored = sum(f.stat().st_size for f in plain.glob("*.safetensors"))  # bf16
        for kind in kinds:
            size = stored * GGUF_SIZE[kind]  # judged before converting: an f32 GGUF of 16 OLMoE layers is 27.7 GB
            if size > available:
                left_out.append(f"llama.cpp {kind}: its GGUF would hold about {size / 2**30:.1f} GiB, "
                                f"more than the {available / 2**30:.1f} GiB available ({source})")
                continue
            gguf = convert(directory, kind, Path(args.llama_cpp))
            results[f"llama.cpp {kind}"] = run_llama(args, gguf, Path(scratch) / f"llama-{kind}.npz")
    report(args, results, left_out, llama_cpp.__version__)


def report(args, results: dict, left_out: list[str], version: str) -> None:
    ran = {name: r for name, r in results.items() if "refused" not in r}
    reference = next((name for name in ("moee-ref float32", "moee-ref bfloat16") if name in ran), None)
    print(f"{args.family}, {args.layers} layers of the real dimensions, {args.texts} PromptEOL texts (random weights), "
          f"{torch.get_num_threads()} threads; llama-cpp-python {version}, f32 KV cache"
          f"{', no extra buffer types' if args.no_extra_buffers else ''}; HS cosine against {reference}")
    print(f"{'side':<20} {'load s':>7} {'load + first text s':>19} {'peak RSS GiB':>12} {'b32 texts/s':>11} {'b1 ms':>7} {'cos HS min':>10}")
    for name, r in results.items():
        if "refused" in r:
            print(f"{name:<20} refused by the loader: {r['refused']}")
            continue
        cos = bench_precision.cosines(ran[reference]["hs"], r["hs"]).min() if reference else float("nan")
        print(f"{name:<20} {r['load_s']:>7.1f} {r['load_s'] + r['first_text_s']:>19.1f} {r['peak_rss_gib']:>12.2f} {r['b32_texts_per_s']:>11.2f} {r['b1_ms']:>7.1f} {cos:>10.6f}")
    for line in left_out:
        print(f"left out: {line}")
    pairs = [("moee-ref bfloat16", "llama.cpp bf16"), ("moee-ref float32", "llama.cpp f32"), ("moee-ref int8", "llama.cpp q8_0"),
             ("moee-ref int8-cached", "llama.cpp q8_0"), ("moee-ref bfloat16", "llama.cpp q8_0")]
    for ours, theirs in pairs:
        if ours in ran and theirs in ran:
            a, b = ran[ours], ran[theirs]
            print(f"{ours} against {theirs}: b32 {a['b32_texts_per_s'] / b['b32_texts_per_s']:.2f}x its rate, "
                  f"b1 {a['b1_ms'] / b['b1_ms']:.2f}x its time, load {a['load_s'] / b['load_s']:.2f}x its time, "
                  f"load + first text {(a['load_s'] + a['first_text_s']) / (b['load_s'] + b['first_text_s']):.2f}x")
    for name, r in ran.items():
        if r.get("int8_kernel"):
            print(f"{name}: {r['int8_kernel']}; prepared cache {r['prepared']}")
    if args.json:
        Path(args.json).write_text(json.dumps({name: {k: v for k, v in r.items() if not isinstance(v, np.ndarray)}
                                               for name, r in results.items()} | {"left_out": left_out}, indent=2))


if __name__ == "__main__":
    main()
