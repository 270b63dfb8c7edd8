"""`moee serve` over loopback against in-process encode() of the same texts, on OLMoE's real dimensions.

A random checkpoint with OLMoE's released config cut to --layers layers (bench_precision.py's, built once in
--workdir). This process loads the model as the server does (the same dtype) and starts a `moee serve`
process on 127.0.0.1 and a free port; then, for short and long texts, --rounds times in turn: in-process
encode() of one text at a time (ms per text) and the server at concurrency 1, text by text in turn (with
the median of their differences); in-process encode() of the texts at batch 32 (texts/s); the server with
clients in this process (one asyncio loop, httpx, one text per request, base64 vectors as the openai
client asks for them) at concurrency 32 and 8 (texts/s, p50/p99 latency). Each figure is the best of its rounds. On a shared host whose speed drifts
from minute to minute, only figures measured in turn compare.
Resident memory: the server's after loading and at its peak (/proc), this process's after loading and at
its peak (its clients add a few MiB), and the bytes of the model's weights.

    python bench/bench_serve.py                 # OLMoE dimensions, 2 layers, dtype auto
    python bench/bench_serve.py --dtype float32

The issue's goals: at concurrency 32 at least 0.9x in-process batch-32 throughput; at concurrency 1, p50 at
most in-process batch-1 time + 5 ms; server memory at most the model's + 0.5 GiB. The clients share the CPU with
the server: on 2 cores that costs the server part of its machine, which in-process encode() never pays.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precision import ensure_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the model routes every token to a few experts and the router weights of each layer describe the text "
         "while hidden states carry its meaning so both together make a better embedding for retrieval and search "
         "tasks across many domains such as news science law medicine music sport travel and cooking").split()


def make_texts(count: int, words: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words + rng.randint(-words // 5, words // 5))).capitalize() + "."
            for _ in range(count)]


def rss_gib(pid: int | str = "self", field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def start_server(model: Path, dtype: str, prompt: str, max_batch_size: int):
    command = [sys.executable, "-m", "moee_ref.cli.main", "serve", "--model", str(model), "--dtype", dtype, "--port", "0",
               "--prompt", prompt, "--max-batch-size", str(max_batch_size)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        print(line.rstrip(), file=sys.stderr)
        if "ready at " in line:
            return proc, line.split("ready at ", 1)[1].split()[0]
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


async def load(url: str, model: str, texts: list[str], concurrency: int) -> dict:
    import httpx

    latencies: list[float] = []
    queue = list(enumerate(texts))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker():
            while queue:
                _, text = queue.pop()
                start = time.perf_counter()
                response = await client.post("/v1/embeddings", json={"model": model, "input": text, "encoding_format": "base64"})
                latencies.append(time.perf_counter() - start)
                response.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {"texts_per_s": len(texts) / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def one_at_a_time(embedder, url: str, model: str, texts: list[str], prompt: str) -> dict:
    """Batch 1 in process and concurrency 1 served, text by text in turn (the same moments of a drifting host)."""
    import httpx

    local, served = [], []
    with httpx.Client(base_url=url, timeout=600) as client:
        for text in texts:
            local.append(1000 * timed(lambda: embedder.encode([text], "moee-sum", prompt=prompt)))
            served.append(1000 * timed(lambda: client.post("/v1/embeddings", json={"model": model, "input": text,
                                                                                   "encoding_format": "base64"}).raise_for_status()))
    served_sorted = sorted(served)
    return {"in-process b1 ms": statistics.median(local),
            "c1": {"texts_per_s": len(texts) / (sum(served) / 1000), "p50_ms": statistics.median(served),
                   "p99_ms": served_sorted[min(len(served) - 1, int(0.99 * len(served)))],
                   "paired_diff_ms": statistics.median(b - a for a, b in zip(local, served))}}


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompt", default="prompteol")
    parser.add_argument("--short", type=int, default=128, help="short texts (about 12 words)")
    parser.add_argument("--long", type=int, default=48, help="long texts (about 180 words)")
    parser.add_argument("--batch1", type=int, default=12, help="texts sent one at a time (in process and at concurrency 1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "moee-ref-bench"))
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()

    import torch

    from moee_ref.embedding.embedder import MoEEmbedder

    model = ensure_checkpoint(Path(ns.workdir) / f"olmoe-{ns.layers}l", "olmoe", ns.layers)
    sets = {"short": make_texts(ns.short, 12, 1), "long": make_texts(ns.long, 180, 2)}
    before = rss_gib()
    embedder = MoEEmbedder.from_pretrained(model, dtype=ns.dtype)
    dtype = str(embedder.model.dtype).removeprefix("torch.")
    weights = sum(p.numel() * p.element_size() for p in embedder.model.state_dict().values()) / 2**30
    report = {"dtype": dtype, "threads": torch.get_num_threads(), "weights_gib": weights, "rss_before_load_gib": before,
              "rss_loaded_gib": rss_gib(), "rows": {}}
    proc, url = start_server(model, dtype, ns.prompt, 32)
    try:
        report["server_rss_ready_gib"] = rss_gib(proc.pid)
        for name, texts in sets.items():
            ones = texts[: ns.batch1]
            embedder.encode(texts[:32], "moee-sum", prompt=ns.prompt, batch_size=32)  # warm-up: kernels of these shapes
            asyncio.run(load(url, str(model), texts[:32], 32))
            rounds = []
            for _ in range(ns.rounds):
                row = one_at_a_time(embedder, url, str(model), ones, ns.prompt)
                row["in-process b32 texts/s"] = len(texts) / timed(lambda: embedder.encode(texts, "moee-sum", prompt=ns.prompt, batch_size=32))
                row["c32"] = asyncio.run(load(url, str(model), texts, 32))
                row["c8"] = asyncio.run(load(url, str(model), texts[: len(texts) // 2], 8))
                rounds.append(row)
                print(name, row, file=sys.stderr)
            report["rows"][name] = rounds
        report["server_peak_rss_gib"] = rss_gib(proc.pid, "VmHWM")
        report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    finally:
        proc.terminate()
        proc.wait(60)
    if ns.json:
        Path(ns.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print("\n| texts | in-process b32 texts/s | served c32 texts/s (ratio) | c32 p50 / p99 ms | served c8 texts/s | c8 p50 / p99 ms "
          "| in-process b1 ms | served c1 p50 / p99 ms | c1 - b1, text by text, ms |\n|---|---|---|---|---|---|---|---|---|")
    for name, rounds in report["rows"].items():
        b32 = max(r["in-process b32 texts/s"] for r in rounds)
        b1 = min(r["in-process b1 ms"] for r in rounds)
        best = {c: max((r[c] for r in rounds), key=lambda x: x["texts_per_s"]) for c in ("c32", "c8")}
        c1 = min((r["c1"] for r in rounds), key=lambda x: x["p50_ms"])
        diff = statistics.median(r["c1"]["paired_diff_ms"] for r in rounds)
        print(f"| {name} | {b32:.2f} | {best['c32']['texts_per_s']:.2f} ({best['c32']['texts_per_s'] / b32:.2f}x) | "
              f"{best['c32']['p50_ms']:.0f} / {best['c32']['p99_ms']:.0f} | {best['c8']['texts_per_s']:.2f} | "
              f"{best['c8']['p50_ms']:.0f} / {best['c8']['p99_ms']:.0f} | {b1:.0f} | {c1['p50_ms']:.0f} / {c1['p99_ms']:.0f} "
              f"| {diff:+.1f} |")
    print(f"\nweights {weights:.2f} GiB; server RSS {report['server_rss_ready_gib']:.2f} GiB ready, {report['server_peak_rss_gib']:.2f} "
          f"GiB peak; this process {report['rss_loaded_gib']:.2f} GiB loaded, {report['peak_rss_gib']:.2f} GiB peak")


if __name__ == "__main__":
    main()
