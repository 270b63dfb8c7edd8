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

from .common import (
    EXIT_ERROR, EXIT_MISMATCH, EXIT_USAGE, Parser, Stopped, UsageError, add_model, add_spec_flags, comma_list, load_embedder,
    positive_int, spec_flags, stop_signals_unwind,
)
from .. import __version__
from ..errors import MoEERefError
from ..embedding.official_tasks import OFFICIAL_BATCH_SIZE

DEFAULT_BATCH_SIZE = 16

def feature_options(ns):
    from ..embedding.embedder import FeatureOptions

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


def load_standardizers(paths):
    from ..embedding.standardize import Standardizer

    return [Standardizer.load(p) for p in paths] if paths else None


def progress_wanted(ns) -> bool | None:
    return False if ns.no_progress else None


def check_mode_flags(ns, options, others=()) -> bool:
    """True for --mode official; refuses the flags the chosen mode has no use for (silently dropping one would give
    vectors the user did not ask for). others: (flag, given) pairs of the command's own default-mode options."""
    from ..embedding.embedder import FeatureOptions

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
    """A corpus job (jobs/corpus.py): chunks saved as they complete beside the output, --resume to continue one."""
    from ..io.inputs import read_records
    from ..io.outputs import check_not_the_input, output_format
    from ..jobs.corpus import embed_corpus

    check_not_the_input(ns.output, [ns.input])  # before anything is read: the output never replaces the input
    fmt = output_format(ns.output, ns.format)
    config = load_config_flag(ns)
    options = feature_options(ns)
    check_mode_flags(ns, options)
    if ns.instruction == "e5":
        raise UsageError("--instruction e5 stands for each MTEB task's own instruction, and moee embed has no task: "
                         "give the instruction's text (e.g. their STS one, 'Retrieve semantically similar text.')")
    if ns.engine == "ray":
        return embed_on_ray(ns, fmt, options, config)
    if ns.ray_address or ns.workers is not None or ns.cpus_per_worker is not None:
        raise UsageError("--ray-address, --workers and --cpus-per-worker are options of --engine ray")
    if ns.chunk_size is not None and ns.chunk_size % ns.batch_size:
        raise UsageError(f"--chunk-size {ns.chunk_size} is not a multiple of --batch-size {ns.batch_size} (a chunk is whole batches)")
    if ns.output == "-" and ns.resume:
        raise UsageError("--resume continues a job saved beside its output file; --output - has none")
    spec = config or embed_spec(ns, options)
    records = read_records(ns.input, text_field=ns.field, id_field=ns.id_field, keep_fields=ns.keep_fields, on_error=ns.on_error)
    log = (lambda message: None) if ns.quiet else None
    result = embed_corpus(records.texts, spec, source=ns.model, load=lambda: load_embedder(ns), output=ns.output, fmt=fmt,
                          batch_size=ns.batch_size, resume=ns.resume, chunk_size=ns.chunk_size,
                          whole_prompts=ns.no_shared_prefix, show_progress=progress_wanted(ns), log=log, records=records,
                          on_error=ns.on_error, save_config=ns.save_config, memory_limit=ns.memory_limit)
    report = result.report
    if ns.quiet:
        return 0
    alpha = f", alpha {report.alpha:.4g}" if report.alpha is not None else ""
    batches = f", the authors' pipeline in batches of {report.batch_size}" if spec.official else ""
    rate = f"; {report.texts_per_second:.1f} texts/s, {report.tokens_per_second:.0f} tokens/s" if report.texts_per_second else ""
    print(f"embedded {len(result.vectors)} texts as {spec.kind} ({result.vectors.shape[1]} dims{alpha}) in {report.dtype}{batches} "
          f"-> {'standard output' if ns.output == '-' else ns.output}{rate}", file=sys.stderr)
    if report.int8_kernel:
        print(f"int8: {report.int8_kernel}; prepared cache {report.prepared or 'not used (layer-streamed)'}", file=sys.stderr)
    if ns.save_config:
        print(f"wrote the embedding configuration to {ns.save_config}: --config {ns.save_config} embeds queries the same way",
              file=sys.stderr)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def load_config_flag(ns):
    """--config FILE: the saved embedding settings, refused beside any flag that would change them."""
    if not getattr(ns, "config", None):
        return None
    from ..embedding.spec import load_config

    config = load_config(ns.config)
    table = spec_flags()
    given = []
    for name, (flags, keywords) in table.items():
        dest = keywords.get("dest", name)
        if name == "alpha":
            changed = getattr(ns, "alpha_given", False)
        else:
            default = keywords.get("default", False if keywords.get("action") == "store_true" else None)
            changed = getattr(ns, dest, default) != default
        if changed:
            given.append(flags[0])
    if given:
        raise UsageError(f"--config {ns.config} holds the embedding settings; drop {', '.join(given)} "
                         "(or save another configuration with --save-config)")
    ns.mode, ns.kind = config.mode, config.kind
    return config


def embed_spec(ns, options):
    """The EmbedSpec of a command's options; the official mode takes its own settings, not the feature options."""
    from ..embedding.spec import EmbedSpec

    common = dict(kind=ns.kind, alpha=ns.alpha, normalize=ns.normalize, standardizers=load_standardizers(ns.standardizer))
    if ns.mode == "official":
        return EmbedSpec(**common, prompt=ns.prompt, mode="official", instruction=ns.instruction, ensemble=ns.ensemble).check()
    return EmbedSpec(**common, **vars(options)).check()


def embed_on_ray(ns, fmt: str, options, config=None) -> int:
    """The same job on Ray Data (jobs/ray_engine.py): a local Ray runtime, or the cluster at --ray-address."""
    from ..io.inputs import read_records
    from ..jobs.ray_engine import embed_dataset, gather, ray_runtime, require_ray, texts_dataset
    from ..io.outputs import check_output_path, write_embeddings

    refused = [flag for flag, given in (("--resume", ns.resume), ("--chunk-size", ns.chunk_size is not None),
                                        ("--mode official", ns.mode == "official"), ("--alpha auto", ns.alpha == "auto"),
                                        ("--memory-budget", ns.memory_budget is not None),
                                        ("--on-error skip", ns.on_error == "skip"), ("--output -", ns.output == "-")) if given]
    if refused:
        raise UsageError(f"--engine ray takes no {', '.join(refused)} (Ray retries failed work itself; batches are "
                         "embedded apart, so nothing chosen over the whole corpus; every worker holds the model)")
    require_ray()
    check_output_path(ns.output)  # before the cluster and the model, not after
    if config is not None and config.standardizers:
        raise UsageError("--engine ray reads standardizers from their files (--standardizer): a --config with standardizers "
                         "runs on the local engine")
    spec = (config or embed_spec(ns, options)).replace(standardizers=())  # each worker reads the standardizer files itself
    records = read_records(ns.input, text_field=ns.field, id_field=ns.id_field, keep_fields=ns.keep_fields)
    texts = records.texts
    workers, cpus = ns.workers or 1, ns.cpus_per_worker or 1
    with ray_runtime(ns.ray_address, workers * cpus, progress_wanted(ns) is not False and len(texts) >= 256):
        dataset = embed_dataset(
            texts_dataset(texts, 4 * workers), ns.model, spec=spec, workers=workers, cpus_per_worker=cpus,
            batch_size=ns.batch_size, dtype=ns.dtype or "auto", int8=ns.int8, share_prefix=not ns.no_shared_prefix,
            standardizer_paths=ns.standardizer, udf_kwargs={"errors_as_rows": True},
        )
        vectors = gather(dataset, len(texts))
    from .. import __version__

    full = config or embed_spec(ns, options)
    model = {"source": str(ns.model)}
    if Path(ns.model).is_dir():  # a hub id is resolved on each worker, not here
        from ..jobs.corpus import model_identity

        model.update(model_identity(ns.model))
    provenance = {"format": "moee_ref.provenance", "moee_ref": __version__, "model": model,
                  "computed": {"dtype": ns.dtype or "auto", "int8": ns.int8, "engine": "ray", "workers": workers},
                  "spec": full.to_json(standardizers="digest"),
                  "input": {"name": records.name, "format": records.format, "rows": len(texts), "embedded": len(texts), "skipped": 0},
                  "dim": int(vectors.shape[1])}
    write_embeddings(ns.output, vectors, fmt, texts if fmt in ("jsonl", "parquet") else None, rows=records.rows,
                     ids=records.ids, fields=records.fields, provenance=provenance)
    if ns.save_config:
        from ..embedding.spec import save_config

        save_config(full, ns.save_config)
    print(f"embedded {len(texts)} texts as {ns.kind} ({vectors.shape[1]} dims) on Ray with {workers} worker(s) -> {ns.output}",
          file=sys.stderr)
    return 0


def cmd_route(ns) -> int:
    from ..embedding.embedder import FeatureOptions, MoEEmbedder
    from ..embedding.routing import route_texts
    from .info import format_routing_table

    if ns.png:
        from ..evaluation.plot import check_picture_path

        check_picture_path(ns.png)  # before the model is loaded
    options = FeatureOptions(prompt=ns.prompt, max_length=ns.max_length, truncation=ns.truncation).check()
    embedder = MoEEmbedder.from_pretrained(ns.model, dtype=ns.dtype or "auto", memory_limit=ns.memory_limit, device=ns.device)
    out, results, last = route_texts(embedder, ns.texts, options, all_tokens=ns.all_tokens, top=ns.top)
    if ns.json:
        print(json.dumps({"model": str(ns.model), "moe_layers": list(out.moe_layers), "texts": results}, indent=2))
    else:
        for result in results:
            print(f"\n{result['text']!r}")
            for token in result["tokens"]:
                print(f"-- token {token['position']} {token['token']!r} (id {token['token_id']})")
                print(format_routing_table(token["layers"]))
    if ns.png:
        from ..evaluation.plot import routing_heatmap

        probs = out.router_probs[0, :, int(last[0])].cpu().numpy()
        routing_heatmap(probs, list(out.moe_layers), ns.png, f"router probabilities at the last token of {ns.texts[0][:40]!r}")
        print(f"wrote {ns.png}", file=sys.stderr)
    return 0


def cmd_eval_sts(ns) -> int:
    from ..io.inputs import read_pairs
    from ..evaluation.sts import evaluate_sts, evaluate_sts_official, format_sts_table

    official = check_mode_flags(ns, feature_options(ns), [("--dev-pairs", ns.dev_pairs)])
    if official and ns.instruction == "e5":
        from ..embedding.official_tasks import STS

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
    from ..evaluation.mteb import require_mteb, run_mteb, task_names_of

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
    from ..loading.checkpoint import load_model
    from ..loading.tokenizer import Tokenizer
    from ..evaluation.verify import format_report, load_reference, verify

    model = load_model(ns.model)
    reference = load_reference(model.source_dir, model.args)
    report = verify(model, Tokenizer.from_dir(model.source_dir), reference)
    print(json.dumps(report.to_dict(), indent=2) if ns.json else format_report(report))
    return 0 if report.passed else EXIT_MISMATCH


def cmd_info(ns) -> int:
    from ..loading.checkpoint import resolve_source
    from ..families import read_config
    from .info import format_facts, model_facts
    from ..kernels.precision import resolve_dtype
    from ..loading.checkpoint import memory_fit
    from .info import int8_facts
    from ..loading.tokenizer import Tokenizer

    if (ns.model is None) == (ns.output is None):
        raise UsageError("give --model (a checkpoint's facts) or --output (what made an output of moee embed), one of them")
    if ns.output is not None:
        from ..io.outputs import read_provenance

        record = read_provenance(ns.output)
        print(json.dumps(record, indent=2) if ns.json else format_provenance(record))
        return 0
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


def format_provenance(record: dict) -> str:
    """An output's provenance as aligned lines: model, how it computed, the settings, the input."""
    lines = [f"made by moee-ref {record.get('moee_ref')}"]
    for section in ("model", "computed", "spec", "input"):
        values = record.get(section) or {}
        lines.append(f"{section}:")
        lines += [f"  {key:<14} {json.dumps(value)}" for key, value in values.items()]
    lines.append(f"dim: {record.get('dim')}")
    return "\n".join(lines)


def cmd_prompts(ns) -> int:
    from ..embedding.prompts import list_prompts

    prompts = list_prompts()
    if ns.json:
        print(json.dumps([{"name": n, "template": t} for n, t in prompts], indent=2))
    else:
        width = max(len(n) for n, _ in prompts)
        for name, template in prompts:
            print(f"{name:<{width}}  {template}")
    return 0


def cmd_demo(ns) -> int:
    from ..demo.run import run_demo

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
    instruction = spec_flags()["instruction"][1]["help"] + (f" ('e5': {e5})" if e5 else "")
    add_spec_flags(p, "mode", "instruction", "ensemble", instruction={"help": instruction})


def add_features(p, alpha_default=1.0) -> None:
    """The feature options of the EmbedSpec and how a run is batched and shown."""
    add_spec_flags(p, "prompt", "alpha", alpha={"default": alpha_default})
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"texts per forward pass (default {DEFAULT_BATCH_SIZE}; with --mode official {OFFICIAL_BATCH_SIZE}, the authors' evaluation default)")
    add_spec_flags(p, "max_length", "truncation", "pooling", "hs_layer", "rw_values", "rw_layers", "standardizers")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-shared-prefix", "--whole-prompts", dest="no_shared_prefix", action="store_true",
                   help="run every prompt from its first token (default: the shared prefix all prompts start with "
                   "runs once; results differ in float32 rounding only)")


def add_log_flags(parser) -> None:
    """--verbose and --quiet after any command too (`moee embed ... --verbose`), not only before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                # SUPPRESS: given before the command, the value stays; given after it, it is set.
                sub.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
                sub.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="errors only: no progress bar, no notes")
                add_log_flags(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moee", description="MoE embeddings (HS, RW, MoEE) from OLMoE, Qwen1.5-MoE and DeepSeekMoE checkpoints.")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--quiet", action="store_true", help="errors only: no progress bar, no notes")
    parser.add_argument("--version", action="version", version=f"moee {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = commands.add_parser("embed", help="embed texts (lines, a JSONL field, a CSV or Parquet column) into .npy, .jsonl or .parquet")
    add_model(p)
    p.add_argument("--input", required=True, metavar="FILE|-",
                   help="texts: one per line (.txt, '-' for stdin), or .jsonl, .json (an array), .csv, .tsv, .parquet "
                        "read by --text-field")
    p.add_argument("--text-field", "--field", dest="field", default=None,
                   help="JSONL field or CSV/Parquet column holding the text (default 'text' for those inputs)")
    p.add_argument("--output", required=True, metavar="OUT|-",
                   help="output file ('-': JSONL on stdout); written under a temporary name and renamed when complete; "
                        "the work is saved in OUT.parts as it goes")
    p.add_argument("--id-field", default=None, metavar="NAME", help="the input's id field or column, carried to every output format")
    p.add_argument("--keep-fields", type=comma_list, default=None, metavar="A,B", help="other input fields or columns to carry to the output")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="a bad row: stop (default), or skip it and list it in OUT.errors.jsonl")
    p.add_argument("--save-config", default=None, metavar="CFG.json",
                   help="write the embedding settings, alpha as used, for later queries (--config, from_pretrained(config=))")
    p.add_argument("--config", default=None, metavar="CFG.json", help="embed with the settings --save-config wrote")
    p.add_argument("--format", choices=["npy", "jsonl", "parquet"], default=None,
                   help="output format (default: from the output name, which it may not contradict; '-' is JSONL)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted job saved in OUT.parts")
    p.add_argument("--chunk-size", type=positive_int, default=None, metavar="N",
                   help="texts per saved chunk, a multiple of --batch-size (default: sized to about 2 minutes of work)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process, resumable (default); ray: Ray Data actors (the distributed extra)")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="a running Ray cluster (default: start a local Ray runtime)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N", help="Ray actors, each with the model (default 1)")
    p.add_argument("--cpus-per-worker", type=positive_int, default=None, metavar="K", help="CPUs and torch threads per actor (default 1)")
    add_spec_flags(p, "kind", "normalize", "allow_empty")
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
    add_spec_flags(p, "max_length", "truncation", truncation={
        "default": "left", "help": "cut over-long texts on this side, the text never the prompt (route's default: left, "
                                   "keeping the end whose routing it shows)"})
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
    add_spec_flags(q, "kind")
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
    p.add_argument("--model", default=None, metavar="SRC", help="checkpoint directory, hub id, or a config.json file")
    p.add_argument("--output", default=None, metavar="FILE", help="instead of a model: the provenance an output of moee embed carries")
    p.add_argument("--memory-limit", default=None, metavar="SIZE", help="memory to size the modes against, instead of what the system reports")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="where int8 loads keep prepared weights (default $MOEE_CACHE_DIR, else ~/.cache/moee-ref)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_info)

    p = commands.add_parser("prompts", help="the built-in prompt names and templates")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_prompts)

    from .analyze import add_analyze_commands

    add_analyze_commands(commands, add_model)

    from .serve import add_serve_command

    add_serve_command(commands, add_model, add_memory)

    p = commands.add_parser("demo", help="build small random checkpoints offline and run the commands on them")
    p.add_argument("--dir", default="demo-checkpoints", help="where to build them (default: %(default)s)")
    p.set_defaults(run=cmd_demo)
    add_log_flags(parser)  # last: every command takes them
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while the command starts (imports, the parser): no traceback
        print("moee: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moee info --json | head`: the reader left; say nothing more
        _quiet_stdout()
        return 141  # the shell's code for SIGPIPE


def _quiet_stdout() -> None:
    """Standard output's pipe is closed: point it at /dev/null, so that the interpreter's last flush is silent."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _main(argv: list[str] | None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:  # without building the parser (which imports torch)
        print(f"moee {__version__}")
        return 0
    parser = build_parser()
    ns = parser.parse_args(argv)
    command = " ".join(filter(None, [ns.command, getattr(ns, "suite", None)]))
    try:
        with stop_signals_unwind():
            check_common(ns)
            return ns.run(ns)
    except UsageError as exc:
        print(f"moee {command}: error: {exc} (see moee {command} --help)", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        raise
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


def check_common(ns) -> None:
    """What every command's options must agree on, before anything is loaded."""
    if ns.verbose and ns.quiet:
        raise UsageError("--verbose and --quiet contradict each other; give one")
    if ns.quiet and hasattr(ns, "no_progress"):
        ns.no_progress = True
    if getattr(ns, "alpha_given", False) and hasattr(ns, "kind"):
        from ..embedding.kinds import KINDS, get_kind

        if not get_kind(ns.kind).uses_alpha:
            users = ", ".join(name for name, k in KINDS.items() if k.uses_alpha)
            raise UsageError(f"--alpha weighs RW against HS in {users}; --kind {ns.kind} does not use it: drop --alpha")


if __name__ == "__main__":
    sys.exit(main())
