"""The `moee` command line.

Exit codes: 0 success; 1 an expected error (missing file, bad model, bad
input), printed as one line without a traceback (--verbose adds it);
2 a usage error, one line; 3 `moee verify` found a mismatch beyond tolerance;
130 Ctrl-C, 143 SIGTERM, 129 SIGHUP, each after the temporary files are removed.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from .cli_common import (
    EXIT_ERROR, EXIT_MISMATCH, EXIT_USAGE, Parser, Stopped, UsageError, add_model, comma_list, load_embedder,
    positive_int, stop_signals_unwind,
)
from .errors import MoEERefError
from .official_eval import OFFICIAL_BATCH_SIZE

DEFAULT_BATCH_SIZE = 16

def feature_options(ns):
    from .embedding.embedder import FeatureOptions

    return FeatureOptions(
        prompt=ns.prompt,
        pooling=ns.pooling,
        hs_layer=ns.hs_layer,
        rw_values=ns.rw_values,
        rw_layers=ns.rw_layers,
        max_length=ns.max_length,
        truncation=ns.truncation,
        allow_empty=getattr(ns, "allow_empty", False),
    )


def parse_alpha(text: str):
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number >= 0 or 'auto', got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"alpha must be a finite number >= 0, got {text!r}")
    return value


def parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 1,2,5; got {text!r}") from None


def load_standardizers(paths):
    from .embedding.standardize import Standardizer

    return [Standardizer.load(p) for p in paths] if paths else None


def progress_wanted(ns) -> bool | None:
    return False if ns.no_progress else None


def check_mode_flags(ns, options, others=()) -> bool:
    """True for --mode official; refuses the flags the chosen mode has no use for (silently dropping one would give
    vectors the user did not ask for). others: (flag, given) pairs of the command's own default-mode options."""
    from .embedding.embedder import FeatureOptions

    if ns.mode != "official":
        given = [flag for flag, value in (("--instruction", ns.instruction), ("--ensemble", ns.ensemble)) if value is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} {'are options' if len(given) > 1 else 'is an option'} of --mode official")
        if ns.batch_size is None:
            ns.batch_size = DEFAULT_BATCH_SIZE
        return False
    defaults = vars(FeatureOptions())
    given = ["--" + k.replace("_", "-") for k, v in vars(options).items() if k not in ("prompt", "allow_empty") and v != defaults[k]]
    given += [flag for flag, value in (("--standardizer", ns.standardizer), ("--alpha auto", ns.alpha == "auto"), *others) if value]
    if given:
        raise UsageError(f"--mode official reproduces the authors' code and takes no {', '.join(given)}")
    if ns.batch_size is None:
        ns.batch_size = OFFICIAL_BATCH_SIZE
    ns.ensemble = ns.ensemble or "standardized"
    return True


# --------------------------------------------------------------------------- commands


def cmd_embed(ns) -> int:
    """A corpus job (corpus.py): chunks saved as they complete beside the output, --resume to continue one."""
    import numpy as np

    from .corpus import CorpusJob, check_disk, disk_needed, model_identity, texts_digest
    from .data import read_texts
    from .embedding.embedder import EncodeReport, Features, show_progress
    from .identity import standardizer_digest
    from .loading.checkpoint import resolve_source
    from .outputs import output_format, write_embeddings

    fmt = output_format(ns.output, ns.format)
    options = feature_options(ns)
    official = check_mode_flags(ns, options)
    if ns.instruction == "e5":
        raise UsageError("--instruction e5 stands for each MTEB task's own instruction, and moee embed has no task: "
                         "give the instruction's text (e.g. their STS one, 'Retrieve semantically similar text.')")
    if ns.engine == "ray":
        return embed_on_ray(ns, fmt, options)
    if ns.ray_address or ns.workers is not None or ns.cpus_per_worker is not None:
        raise UsageError("--ray-address, --workers and --cpus-per-worker are options of --engine ray")
    if ns.chunk_size is not None and ns.chunk_size % ns.batch_size:
        raise UsageError(f"--chunk-size {ns.chunk_size} is not a multiple of --batch-size {ns.batch_size} (a chunk is whole batches)")
    job = CorpusJob(ns.output, resume=ns.resume, chunk_size=ns.chunk_size)  # the output checked before hours of work
    try:
        texts = read_texts(ns.input, ns.field)
        standardizer = load_standardizers(ns.standardizer)
        settings = {"mode": ns.mode, "kind": ns.kind, "alpha": ns.alpha, "normalize": ns.normalize, "batch_size": ns.batch_size,
                    **{k: (list(v) if k == "rw_layers" and v is not None else v) for k, v in vars(options).items()},
                    "standardizer": standardizer_digest(standardizer) if standardizer else None,
                    "whole_prompts": ns.no_shared_prefix,
                    **({"instruction": ns.instruction, "ensemble": ns.ensemble} if official else {})}
        identity = {"input": {"texts": len(texts), "sha256": texts_digest(texts)}, "settings": settings}
        if job.manifest is not None:  # a resume: another model, input or options refused before the model is loaded
            job.check({"model": model_identity(resolve_source(ns.model)), **identity})
        embedder = load_embedder(ns)
        model = embedder.model
        identity = {"model": model_identity(model.source_dir), **identity}
        # What loading decided (the auto dtype, int8 or streamed where memory is short): each changes the vectors.
        identity["computed"] = {"dtype": str(model.dtype).removeprefix("torch."), "int8": bool(getattr(model, "int8", False)),
                                "streamed": embedder.streamed, "device": str(getattr(model, "device", "cpu"))}
        if identity["computed"]["int8"]:  # int8 x int8 or weight-only: other rounding, so not mixed in one job
            identity["computed"]["int8_integer"] = (getattr(model, "int8_kernel", None) or "").startswith("int8 x int8")
        job.check({"computed": identity["computed"]})
        if official:
            order, truncated, width = list(range(len(texts))), 0, embedder.dimension(ns.kind)
        else:
            order, truncated = embedder.corpus_order(texts, options)
            width = embedder.dimension("moee-concat", options.rw_layers)
        dim = embedder.dimension(ns.kind, None if official else options.rw_layers)
        check_disk(job.output.parent, disk_needed(len(order), width, len(texts), dim, fmt, sum(len(t.encode()) for t in texts)))
        job.start(identity, len(order), "vectors" if official else "features", width)

        def compute(start: int, end: int):
            rows = order[start:end]
            chunk = [texts[i] for i in rows]
            if official:
                from .official import encode_official

                return encode_official(embedder, chunk, ns.kind, prompt=ns.prompt, instruction=ns.instruction, alpha=ns.alpha,
                                       ensemble=ns.ensemble, batch_size=ns.batch_size, normalize=ns.normalize,
                                       show_progress_bar=False)
            feats = embedder.features(chunk, options, batch_size=ns.batch_size, show_progress_bar=False, row_names=rows)
            return np.concatenate([feats.hs, feats.rw], axis=1)

        chunks = job.run(len(order), ns.batch_size, compute, streamed=embedder.streamed,
                         show_progress=show_progress(progress_wanted(ns), len(texts)))
        stacked = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
        if official:
            vectors = np.zeros((len(texts), width), np.float32)
            vectors[order] = stacked
            report = EncodeReport(num_texts=len(texts), alpha=float(ns.alpha) if ns.kind == "moee-sum" else None,
                                  dtype=identity["computed"]["dtype"], dtype_reason=getattr(model, "dtype_reason", None),
                                  batch_size=ns.batch_size)
        else:
            hidden = embedder.args.hidden_size
            hs = np.zeros((len(texts), hidden), np.float32)
            rw = np.zeros((len(texts), width - hidden), np.float32)
            hs[order], rw[order] = stacked[:, :hidden], stacked[:, hidden:]  # texts with no token stay zero
            vectors = embedder.vectors_from_features(Features(hs, rw, truncated), ns.kind, options, alpha=ns.alpha,
                                                     batch_size=ns.batch_size, normalize=ns.normalize, standardizer=standardizer)
            report = embedder.last_report
        write_embeddings(ns.output, vectors, fmt, texts if fmt in ("jsonl", "parquet") else None)
    except (Stopped, KeyboardInterrupt) as exc:
        exc.detail = job.stopped_detail()
        raise
    except BaseException:
        job.failed()
        raise
    job.remove()
    alpha = f", alpha {report.alpha:.4g}" if report.alpha is not None else ""
    batches = f", the authors' pipeline in batches of {report.batch_size}" if official else ""
    print(f"embedded {len(texts)} texts as {ns.kind} ({vectors.shape[1]} dims{alpha}) in {report.dtype}{batches} -> {ns.output}",
          file=sys.stderr)
    if getattr(model, "int8", False):
        print(f"int8: {model.int8_kernel}; prepared cache {model.prepared or 'not used (layer-streamed)'}", file=sys.stderr)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def embed_on_ray(ns, fmt: str, options) -> int:
    """The same job on Ray Data (distributed.py): a local Ray runtime, or the cluster at --ray-address."""
    from .data import read_texts
    from .distributed import embed_dataset, gather, ray_runtime, require_ray, texts_dataset
    from .outputs import check_output_path, write_embeddings

    refused = [flag for flag, given in (("--resume", ns.resume), ("--chunk-size", ns.chunk_size is not None),
                                        ("--mode official", ns.mode == "official"), ("--alpha auto", ns.alpha == "auto"),
                                        ("--memory-budget", ns.memory_budget is not None)) if given]
    if refused:
        raise UsageError(f"--engine ray takes no {', '.join(refused)} (Ray retries failed work itself; batches are "
                         "embedded apart, so nothing chosen over the whole corpus; every worker holds the model)")
    require_ray()
    check_output_path(ns.output)  # before the cluster and the model, not after
    texts = read_texts(ns.input, ns.field)
    workers, cpus = ns.workers or 1, ns.cpus_per_worker or 1
    opts = {k: v for k, v in vars(options).items() if k != "prompt"}
    with ray_runtime(ns.ray_address, workers * cpus, progress_wanted(ns) is not False and len(texts) >= 256):
        dataset = embed_dataset(
            texts_dataset(texts, 4 * workers), ns.model, kind=ns.kind, workers=workers, cpus_per_worker=cpus,
            batch_size=ns.batch_size, dtype=ns.dtype or "auto", int8=ns.int8, share_prefix=not ns.no_shared_prefix,
            prompt=ns.prompt, alpha=ns.alpha, normalize=ns.normalize, standardizer_paths=ns.standardizer,
            udf_kwargs={"errors_as_rows": True}, **opts,
        )
        vectors = gather(dataset, len(texts))
    write_embeddings(ns.output, vectors, fmt, texts if fmt in ("jsonl", "parquet") else None)
    print(f"embedded {len(texts)} texts as {ns.kind} ({vectors.shape[1]} dims) on Ray with {workers} worker(s) -> {ns.output}",
          file=sys.stderr)
    return 0


def cmd_route(ns) -> int:
    import torch

    from .kernels.precision import resolve_device
    from .loading.checkpoint import load_model
    from .embedding.embedder import last_real_position
    from .info import format_routing_table, routing_table
    from .embedding.prompts import apply_prompt, resolve_prompt
    from .tokenizer import Tokenizer

    if ns.png:
        from .plot import check_picture_path

        check_picture_path(ns.png)  # before the model is loaded
    model = load_model(ns.model, dtype=ns.dtype or "auto", memory_limit=ns.memory_limit, device=resolve_device(ns.device))
    tokenizer = Tokenizer.from_dir(model.source_dir)
    template = resolve_prompt(ns.prompt)
    prompted = [apply_prompt(template, t) for t in ns.texts]
    batch = tokenizer.encode_batch(prompted, max_length=ns.max_length, truncation_side="left" if ns.max_length else "right")
    with torch.inference_mode():
        out = model(batch.input_ids, batch.attention_mask)
    last = last_real_position(batch.attention_mask)
    results = []
    for row, text in enumerate(ns.texts):
        positions = range(int(last[row]) - batch.lengths[row] + 1, int(last[row]) + 1) if ns.all_tokens else [int(last[row])]
        tokens = []
        for pos in positions:
            token_id = int(batch.input_ids[row, pos])
            tokens.append({"position": pos - (int(last[row]) - batch.lengths[row] + 1), "token_id": token_id,
                           "token": tokenizer.decode([token_id]), "layers": routing_table(out, row, pos, top=ns.top)})
        results.append({"text": text, "tokens": tokens})
    if ns.json:
        print(json.dumps({"model": str(ns.model), "moe_layers": list(out.moe_layers), "texts": results}, indent=2))
    else:
        for result in results:
            print(f"\n{result['text']!r}")
            for token in result["tokens"]:
                print(f"-- token {token['position']} {token['token']!r} (id {token['token_id']})")
                print(format_routing_table(token["layers"]))
    if ns.png:
        from .plot import routing_heatmap

        probs = out.router_probs[0, :, int(last[0])].cpu().numpy()
        routing_heatmap(probs, list(out.moe_layers), ns.png, f"router probabilities at the last token of {ns.texts[0][:40]!r}")
        print(f"wrote {ns.png}", file=sys.stderr)
    return 0


def cmd_eval_sts(ns) -> int:
    from .data import read_pairs
    from .evaluate import evaluate_sts, evaluate_sts_official, format_sts_table

    if ns.alpha == "auto":
        raise UsageError("--alpha sets the fixed alpha row; the auto row is always reported")
    official = check_mode_flags(ns, feature_options(ns), [("--dev-pairs", ns.dev_pairs)])
    if official and ns.instruction == "e5":
        from .official_eval import STS

        ns.instruction = STS  # the E5 instruction their evaluation gives every STS task
    pairs = read_pairs(ns.pairs, ns.format)
    dev = read_pairs(ns.dev_pairs, ns.format) if ns.dev_pairs else None
    embedder = load_embedder(ns)
    if official:
        result = evaluate_sts_official(embedder, pairs, prompt=ns.prompt, instruction=ns.instruction, alpha=ns.alpha,
                                       ensemble=ns.ensemble, batch_size=ns.batch_size, show_progress_bar=progress_wanted(ns))
    else:
        result = evaluate_sts(
            embedder, pairs, alpha=ns.alpha, dev_pairs=dev, options=feature_options(ns), batch_size=ns.batch_size,
            standardizer=load_standardizers(ns.standardizer), show_progress_bar=progress_wanted(ns),
        )
    result["model"] = str(ns.model)
    result["prompt"] = ns.prompt or "none"
    print(json.dumps(result, indent=2) if ns.json else format_sts_table(result))
    return 0


def cmd_eval_mteb(ns) -> int:
    from .mteb_wrapper import require_mteb, run_mteb, task_names_of

    if ns.alpha == "auto":
        raise UsageError("moee eval mteb takes a fixed --alpha")
    prompts = {k: v for k, v in (("query", ns.query_prompt), ("document", ns.document_prompt)) if v is not None}
    official = check_mode_flags(ns, feature_options(ns), [("--query-prompt", ns.query_prompt), ("--document-prompt", ns.document_prompt)])
    require_mteb()
    tasks = task_names_of(ns.tasks, ns.task_types)
    embedder = load_embedder(ns)
    common = dict(kind=ns.kind, prompt=ns.prompt, alpha=ns.alpha, batch_size=ns.batch_size, output_dir=ns.output_dir,
                  languages=ns.languages, show_progress_bar=progress_wanted(ns))
    if official:
        results = run_mteb(embedder, tasks, mode="official", instruction=ns.instruction, ensemble=ns.ensemble, **common)
    else:
        # MTEB data holds empty texts: the wrapper embeds them (allow_empty), as the API's MoEEEncoder does.
        opts = {k: v for k, v in vars(feature_options(ns)).items() if k not in ("prompt", "allow_empty")}
        results = run_mteb(embedder, tasks, standardizer=load_standardizers(ns.standardizer), prompts=prompts, **common, **opts)
    if ns.json:
        print(json.dumps(results, indent=2))
    else:
        for task, scores in results.items():
            print(f"{task:<40} main score {scores['main_score']:.4f}")
    return 0


def cmd_verify(ns) -> int:
    from .loading.checkpoint import load_model
    from .tokenizer import Tokenizer
    from .verify import format_report, load_reference, verify

    model = load_model(ns.model)
    reference = load_reference(model.source_dir, model.args)
    report = verify(model, Tokenizer.from_dir(model.source_dir), reference)
    print(json.dumps(report.to_dict(), indent=2) if ns.json else format_report(report))
    return 0 if report.passed else EXIT_MISMATCH


def cmd_info(ns) -> int:
    from .loading.checkpoint import resolve_source
    from .families import read_config
    from .info import format_facts, model_facts
    from .kernels.precision import resolve_dtype
    from .loading.checkpoint import memory_fit
    from .info import int8_facts
    from .tokenizer import Tokenizer

    given = Path(ns.model)
    if given.is_file() and given.suffix == ".json":  # a bare config.json: facts without weights or tokenizer
        args, tokenizer = read_config(given), None
    else:
        directory = resolve_source(ns.model)
        args = read_config(directory)
        tokenizer = Tokenizer.from_dir(directory) if (directory / "tokenizer.json").is_file() else None
    facts = model_facts(args, tokenizer)
    facts["source"] = str(ns.model)
    dtype, reason = resolve_dtype("auto")
    facts["compute"] = {"auto_dtype": str(dtype).removeprefix("torch."), "reason": reason}
    if not given.is_file() and any(directory.glob("*.safetensors")):  # sizes from the shards' headers, nothing read
        facts["memory_fit"] = memory_fit(directory, ns.memory_limit)
        facts["int8"] = int8_facts(directory, args, dtype, ns.cache_dir)
    print(json.dumps(facts, indent=2) if ns.json else format_facts(facts))
    return 0


def cmd_prompts(ns) -> int:
    from .embedding.prompts import list_prompts

    prompts = list_prompts()
    if ns.json:
        print(json.dumps([{"name": n, "template": t} for n, t in prompts], indent=2))
    else:
        width = max(len(n) for n, _ in prompts)
        for name, template in prompts:
            print(f"{name:<{width}}  {template}")
    return 0


def cmd_demo(ns) -> int:
    from .demo.run import run_demo

    return run_demo(Path(ns.dir), main)


# --------------------------------------------------------------------------- parser


def add_memory(p) -> None:
    """Options for models larger than memory (loading/streamed.py, kernels/int8.py)."""
    p.add_argument("--memory-budget", default=None, metavar="SIZE", help="layer-streamed mode within this budget, e.g. 8GB: every layer is read once per run")
    p.add_argument("--int8", action="store_true", help="int8 attention and expert matrices (about a quarter of fp32 memory)")
    add_cache(p)
    p.add_argument("--spill-dir", default=None, metavar="DIR", help="where the streamed mode spills activations over budget (default: the temp dir)")


def add_cache(p) -> None:
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where int8 loads keep prepared weights (default $MOEE_CACHE_DIR, else ~/.cache/moee-ref)")
    p.add_argument("--no-prepared-cache", action="store_true", help="int8: quantize from the checkpoint, neither reading nor writing the cache")


def add_official(p, e5: str | None = None) -> None:
    """--mode and the official mode's own options (official.py)."""
    p.add_argument("--mode", choices=["default", "official"], default="default", help="'official' reproduces the authors' code (see README)")
    p.add_argument("--instruction", default=None, metavar="TEXT",
                   help="official mode: an instruction before every sentence, in their GritLM format" + (f" ('e5': {e5})" if e5 else ""))
    p.add_argument("--ensemble", choices=["standardized", "unstandardized"], default=None,
                   help="official mode: moee-sum of per-batch standardised HS and RW (default) or of the raw ones")


def add_features(p, alpha_default="1.0") -> None:
    from .embedding.embedder import HS_LAYERS, POOLINGS, RW_VALUES

    p.add_argument("--prompt", default=None, help="built-in prompt name (see `moee prompts`) or a template with {text}; default none")
    p.add_argument("--alpha", type=parse_alpha, default=parse_alpha(alpha_default), help="moee-sum weight of RW: a number >= 0 or 'auto' (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"texts per forward pass (default {DEFAULT_BATCH_SIZE}; with --mode official {OFFICIAL_BATCH_SIZE}, the authors' evaluation default)")
    p.add_argument("--max-length", type=positive_int, default=None, help="token budget per text (default: the model's maximum)")
    p.add_argument("--truncation", choices=["left", "right"], default=None, help="cut over-long texts on this side (default: refuse them)")
    p.add_argument("--pooling", choices=POOLINGS, default="last", help="token pooling for HS and RW (default last)")
    p.add_argument("--hs-layer", choices=HS_LAYERS, default="last", help="HS from the last layer or the mean of all layers")
    p.add_argument("--rw-values", choices=RW_VALUES, default="probs", help="routing weights as probabilities or raw logits")
    p.add_argument("--rw-layers", type=parse_layers, default=None, metavar="L1,L2,...", help="MoE layers to use for RW (default all)")
    p.add_argument("--standardizer", action="append", default=None, metavar="FILE.npz", help="fitted standardizer for the hs or rw component (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-shared-prefix", "--whole-prompts", dest="no_shared_prefix", action="store_true",
                   help="run every prompt from its first token (default: the shared prefix all prompts start with "
                   "runs once; results differ in float32 rounding only)")


def build_parser() -> argparse.ArgumentParser:
    from .embedding.embedder import KINDS

    parser = Parser(prog="moee", description="MoE embeddings (HS, RW, MoEE) from OLMoE, Qwen1.5-MoE and DeepSeekMoE checkpoints.")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = commands.add_parser("embed", help="embed texts (lines, a JSONL field, a CSV or Parquet column) into .npy, .jsonl or .parquet")
    add_model(p)
    p.add_argument("--input", required=True, metavar="FILE|-",
                   help="texts, one per line ('-' for stdin); .jsonl, .csv and .parquet files are read by --text-field")
    p.add_argument("--text-field", "--field", dest="field", default=None,
                   help="JSONL field or CSV/Parquet column holding the text (default 'text' for those inputs)")
    p.add_argument("--output", required=True, metavar="OUT",
                   help="output file; written under a temporary name and renamed when complete; the work is saved in OUT.parts as it goes")
    p.add_argument("--format", choices=["npy", "jsonl", "parquet"], default=None, help="output format (default: from the output name)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted job saved in OUT.parts")
    p.add_argument("--chunk-size", type=positive_int, default=None, metavar="N",
                   help="texts per saved chunk, a multiple of --batch-size (default: sized to about 2 minutes of work)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process, resumable (default); ray: Ray Data actors (the distributed extra)")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="a running Ray cluster (default: start a local Ray runtime)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N", help="Ray actors, each with the model (default 1)")
    p.add_argument("--cpus-per-worker", type=positive_int, default=None, metavar="K", help="CPUs and torch threads per actor (default 1)")
    p.add_argument("--kind", choices=KINDS, default="moee-sum", help="embedding kind (default %(default)s)")
    p.add_argument("--normalize", action="store_true", help="scale every vector to unit length")
    p.add_argument("--allow-empty", action="store_true", help="embed empty lines (the prompt alone) instead of refusing them")
    add_official(p)
    add_features(p)
    add_memory(p)
    p.set_defaults(run=cmd_embed)

    p = commands.add_parser("route", help="which experts each MoE layer picks for a text, as a table, JSON or heatmap")
    add_model(p)
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--prompt", default=None, help="prompt name or template with {text}")
    p.add_argument("--all-tokens", action="store_true", help="every token, not only the last")
    p.add_argument("--top", type=positive_int, default=None, help="show only the N heaviest experts of the top-k")
    p.add_argument("--max-length", type=positive_int, default=None, help="keep only the last N tokens")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--png", metavar="FILE", default=None, help="layer x expert heatmap of the first text's last token (needs the plot extra)")
    p.set_defaults(run=cmd_route)

    p = commands.add_parser("eval", help="score embeddings: sts (pairs with gold scores) or mteb")
    evals = p.add_subparsers(dest="suite", required=True, metavar="SUITE", parser_class=Parser)
    q = evals.add_parser("sts", help="Spearman/Pearson of hs, rw, moee-concat and moee-sum against gold scores")
    add_model(q)
    q.add_argument("--pairs", required=True, metavar="FILE", help="TSV/CSV with header sentence1,sentence2,score, or JSONL with those keys")
    q.add_argument("--dev-pairs", default=None, metavar="FILE", help="labelled development pairs: adds a row with the supervised alpha")
    q.add_argument("--format", choices=["tsv", "csv", "jsonl"], default=None, help="pair file format (default: from the name)")
    q.add_argument("--json", action="store_true", help="print JSON")
    add_official(q, e5="their E5 STS instruction")
    add_features(q)
    add_memory(q)
    q.set_defaults(run=cmd_eval_sts)
    q = evals.add_parser("mteb", help="run MTEB tasks with an encoder wrapper (needs the mteb extra and the task data)")
    add_model(q)
    q.add_argument("--tasks", required=True, type=comma_list, help="comma-separated MTEB task names, e.g. STS12,SICK-R; 'paper' for the paper's set")
    q.add_argument("--task-types", default=None, type=comma_list, metavar="TYPES", help="keep the tasks of these types, e.g. STS,Clustering")
    q.add_argument("--languages", default=None, type=comma_list, metavar="CODES", help="keep the subsets wholly in these languages, e.g. eng")
    q.add_argument("--kind", choices=KINDS, default="moee-sum", help="embedding kind (default %(default)s)")
    q.add_argument("--query-prompt", default=None, metavar="P", help="prompt for the texts mteb marks as queries (a prefix, template or name)")
    q.add_argument("--document-prompt", default=None, metavar="P", help="prompt for the texts mteb marks as documents")
    q.add_argument("--output-dir", default=None, help="where mteb writes its result files")
    q.add_argument("--json", action="store_true", help="print JSON")
    add_official(q, e5="each task's E5 instruction, as their evaluation does by default")
    add_features(q)
    q.set_defaults(run=cmd_eval_mteb)

    p = commands.add_parser("verify", help="compare moee-ref with transformers on a checkpoint (needs the test extra)")
    # No --dtype: the comparison always runs in float32 (its tolerances are float32's).
    p.add_argument("--model", required=True, metavar="SRC", help="local checkpoint directory or hub id (owner/name)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_verify)

    p = commands.add_parser("info", help="family, layers, experts, parameter counts, memory, tokenizer, RW dimension")
    p.add_argument("--model", required=True, metavar="SRC", help="checkpoint directory, hub id, or a config.json file")
    p.add_argument("--memory-limit", default=None, metavar="SIZE", help="memory to size the modes against, instead of what the system reports")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="where int8 loads keep prepared weights (default $MOEE_CACHE_DIR, else ~/.cache/moee-ref)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_info)

    p = commands.add_parser("prompts", help="the built-in prompt names and templates")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_prompts)

    from .analysis_cli import add_analyze_commands

    add_analyze_commands(commands, add_model)

    p = commands.add_parser("demo", help="build small random checkpoints offline and run the commands on them")
    p.add_argument("--dir", default="demo-checkpoints", help="where to build them (default: %(default)s)")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    command = " ".join(filter(None, [ns.command, getattr(ns, "suite", None)]))
    try:
        with stop_signals_unwind():
            return ns.run(ns)
    except UsageError as exc:
        print(f"moee {command}: error: {exc} (see moee {command} --help)", file=sys.stderr)
        return EXIT_USAGE
    except (MoEERefError, OSError) as exc:
        if ns.verbose:
            traceback.print_exc()
        print(f"moee {command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        detail = getattr(exc, "detail", None)  # a corpus job's: what is saved and how to resume
        print(f"moee {command}: interrupted" + (f"; {detail}" if detail else ""), file=sys.stderr)
        return 130
    except Stopped as exc:
        print(f"moee {command}: stopped by {exc}; {getattr(exc, 'detail', None) or 'nothing was left half-written'}", file=sys.stderr)
        return 128 + exc.signum  # the shell's code for a process ended by that signal


if __name__ == "__main__":
    sys.exit(main())
