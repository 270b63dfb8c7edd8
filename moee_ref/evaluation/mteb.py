"""MTEB evaluation of MoEE embeddings (optional extra: pip install 'moee-ref[mteb]').

    encoder = MoEEEncoder(embedder, "moee-sum", prompt="prompteol", alpha=1.0)
    mteb.evaluate(encoder, tasks)                       # mteb's own entry point, or:
    scores = run_mteb(embedder, ["STS12", "STS13"], kind="moee-sum", prompt="prompteol")

MoEEEncoder follows mteb's EncoderProtocol (mteb >= 2): encode() receives a
DataLoader of batches and reads their "text" field, which mteb fills for every
text task (for reranking documents it is title and body joined, for queries
the query with its instruction). The prompt is the fixed MoEE prompt (none,
PromptEOL, ...) for every task: mteb's per-task instructions are not used, as
in the paper; `prompts={"query": ..., "document": ...}` gives the texts mteb marks
as queries or documents (retrieval, reranking) prompts of their own. Similarity is cosine; for moee-sum the vectors are
[h/|h|; sqrt(alpha) r/|r|], so cosine ranks pairs as the paper's weighted sum.

mode="official" runs the authors' pipeline instead (official.py): their prompt names, per-batch
standardisation in batches of 64, "" kept, and instruction=None, a text, or "e5" (each task's E5
instruction, official_tasks.py, as their evaluation does by default). Similarity is then what their
reranking, retrieval and summarization scorers compute: cosine, and for moee-sum the dot product of
[h/|h|; sqrt(alpha) r/|r|], i.e. cos(HS) + alpha cos(RW) with a zero part scoring 0. mteb's STS and
pair-classification scores are its own cosine of the vectors: the same ranking, except where a batch of one
text made a part zero (their scorer gives it 0.5 or 1.0). Classification and clustering with moee-sum are
refused: their code averages the label ids of two models there, which has no vector form.

mteb itself is imported only when an encoder's metadata is built or
run_mteb() runs, so this module imports without it.
"""

from __future__ import annotations

import hashlib
import math
import socket
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..embedding import pipeline
from ..embedding.embedder import FeatureOptions, MoEEmbedder, positive_int
from ..embedding.kinds import get_kind
from ..embedding.spec import EmbedSpec
from ..errors import InputError, MissingExtraError, MoEERefError
from ..embedding.official_tasks import OFFICIAL_BATCH_SIZE, e5_instruction
from ..loading.identity import checkpoint_identity, standardizer_digest
from ..embedding.conventions import check_prompts, named_prompt
from ..embedding.prompts import PLACEHOLDER, list_prompts, resolve_prompt

MISSING_MTEB = "moee eval mteb needs the optional mteb package: pip install mteb (in a clone of moee-ref: pip install -e '.[mteb]')"
# The datasets the paper's tables name (Tables 8 to 12 and Table 3's Summarization column), by task type: all
# English STS and Summarization tasks, and small ones of the other types. The paper speaks of 20 datasets
# and names these 19. `--tasks paper`; `--task-types` keeps some of the types.
PAPER_TASKS = {
    "Classification": ["TweetSentimentExtractionClassification", "EmotionClassification", "ToxicConversationsClassification"],
    "Clustering": ["TwentyNewsgroupsClustering", "MedrxivClusteringS2S"],
    "PairClassification": ["TwitterURLCorpus", "TwitterSemEval2015"],
    "Reranking": ["AskUbuntuDupQuestions", "SciDocsRR", "StackOverflowDupQuestions"],
    "STS": ["STS12", "STS13", "STS14", "STS15", "STS16", "BIOSSES", "SICK-R", "STSBenchmark"],
    "Summarization": ["SummEval"],
}
HUB_PROBE_SECONDS = 3.0  # how long to wait for the hub before loading task data from the local cache only
PROMPT_TYPES = ("query", "document")  # mteb's PromptType values
REFERENCE = "https://github.com/tianyi-lab/MoE-Embedding"


class TaskDataError(MoEERefError):
    """An MTEB task's dataset could not be loaded (usually: no network and no local copy)."""


def require_mteb():
    """The mteb module, or MissingExtraError when it is not installed."""
    try:
        import mteb
    except ImportError as exc:
        raise MissingExtraError(MISSING_MTEB) from exc
    return mteb


class MoEEEncoder:
    """An mteb encoder (mteb.models.EncoderProtocol) for one MoEE configuration of an MoEEmbedder."""

    def __init__(
        self,
        embedder: MoEEmbedder,
        kind: str = "moee-sum",
        *,
        prompt: str | None = None,
        alpha: float = 1.0,
        batch_size: int | None = None,
        standardizer=None,
        show_progress_bar: bool | None = None,
        prompts: dict[str, str] | None = None,
        normalize: bool | None = None,
        mode: str = "default",
        instruction: str | None = None,
        ensemble: str | None = None,
        **feature_options,
    ):
        """normalize: unit-length rows; by default for moee-sum only, whose rows otherwise have length
        sqrt(1 + alpha): cosine is the same either way, and a classifier on unit rows sees alpha only as the
        balance of HS and RW, not as a scale of every feature.
        standardizer: fitted Standardizer(s) applied to every text mteb asks for, as encode() applies them.
        show_progress_bar: fixed for every call (None: what mteb asks for, and no bar when it asks nothing).
        prompts: {"query": ..., "document": ...}, the prompt for the texts mteb marks with that prompt_type
        (retrieval, reranking), a prefix as sentence-transformers has it or a template or a built-in name;
        every other text gets `prompt`. None: `prompt` for all, the paper's single template.
        mode: "official" for the authors' pipeline (module docstring), with its instruction (None, a text, or "e5")
        and ensemble ("standardized" or "unstandardized" HS and RW in moee-sum); it takes none of the options
        above but prompt (one of their names), alpha, batch_size (default theirs, 64) and show_progress_bar."""
        if mode not in ("default", "official"):
            raise InputError(f"mode={mode!r} is not valid; choose default or official")
        self.mode, self.instruction, self.ensemble = mode, instruction, ensemble
        if mode == "official":
            self._init_official(embedder, kind, prompt, alpha, batch_size, show_progress_bar, standardizer, prompts, normalize,
                                feature_options)
            return
        if instruction is not None or ensemble is not None:
            raise InputError("instruction and ensemble are options of mode='official'")
        uses_alpha = get_kind(kind).uses_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise InputError(
                f"alpha must be a finite number >= 0 for MTEB, got {alpha!r}: each side of a pair is encoded "
                "separately, so choose alpha beforehand (MoEEmbedder.select_alpha) instead of 'auto'"
            )
        feature_options.setdefault("allow_empty", True)  # MTEB data holds some empty texts
        # MTEB documents can outgrow the model: cut at its length (the text, never the prompt), counted in num_truncated.
        feature_options.setdefault("max_length", embedder.max_seq_length)
        feature_options.setdefault("truncation", "right")
        options = FeatureOptions.from_keywords(feature_options, type(self), prompt=prompt)
        options.check()
        self.template = resolve_prompt(prompt)  # fails early on an unknown prompt name
        self.prompts = check_prompts(prompts, None)
        unknown = sorted(set(self.prompts) - set(PROMPT_TYPES))
        if unknown:
            raise InputError(f"prompts takes the keys {', '.join(PROMPT_TYPES)} (mteb's prompt types), got {', '.join(unknown)}")
        for name in self.prompts:
            resolve_prompt(named_prompt(self.prompts, name, None, None))
        self.embedder = embedder
        self.kind = kind
        self.prompt = prompt
        self.alpha = float(alpha)
        self.batch_size = batch_size
        self.standardizer = standardizer
        self.show_progress_bar = show_progress_bar
        self.feature_options = {k: v for k, v in vars(options).items() if k != "prompt"}
        self.normalize = uses_alpha if normalize is None else bool(normalize)
        # How every text is embedded; each call replaces the prompt with its prompt type's.
        self.spec = EmbedSpec(kind=kind, alpha=self.alpha if uses_alpha else 1.0, normalize=self.normalize,
                              standardizers=standardizer, **vars(options)).check()
        self.num_truncated = 0  # texts cut to max_length since this encoder was made (run_mteb: per task)
        self._meta = None

    def _init_official(self, embedder, kind, prompt, alpha, batch_size, show_progress_bar, standardizer, prompts, normalize,
                       feature_options):
        from ..embedding.official import check_official

        given = [name for name, value in (("standardizer", standardizer), ("prompts", prompts), ("normalize", normalize))
                 if value is not None] + sorted(feature_options)
        if given:
            raise InputError(f"mode='official' reproduces the authors' pipeline and takes no {', '.join(given)}")
        self.ensemble = self.ensemble or "standardized"
        check_official(embedder, kind, prompt, alpha, self.ensemble)
        if self.instruction is not None and not isinstance(self.instruction, str):
            raise InputError(f"instruction must be a string, 'e5' or None, got {type(self.instruction).__name__}")
        self.embedder, self.kind, self.prompt, self.alpha = embedder, kind, prompt, float(alpha)
        self.batch_size = OFFICIAL_BATCH_SIZE if batch_size is None else positive_int("batch_size", batch_size)
        self.standardizer, self.prompts, self.normalize = None, {}, False
        self.show_progress_bar = show_progress_bar
        self.template = prompt or "none"
        self.feature_options = {"rw_layers": None, "max_length": None}  # what the metadata reads
        self.num_truncated = 0  # never: the authors' prompts are not truncated
        self._meta = None

    def _encode_official(self, texts, task_metadata, prompt_type, show_progress_bar) -> np.ndarray:
        from ..embedding.official import encode_official

        instruction = self.instruction
        if instruction == "e5":
            if task_metadata is None:
                raise InputError("instruction='e5' takes each task's E5 instruction, and mteb named no task")
            instruction = e5_instruction(task_metadata.name, prompt_type)
        return encode_official(self.embedder, texts, self.kind, prompt=self.prompt, instruction=instruction, alpha=self.alpha,
                               ensemble=self.ensemble, batch_size=self.batch_size, show_progress_bar=show_progress_bar)

    # ------------------------------------------------------------ the protocol

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None, **kwargs) -> np.ndarray:
        """float32 [N, dim] for the texts of all batches of `inputs`, in order."""
        precision = kwargs.get("precision")
        if precision not in (None, "float32"):
            # mteb files such results as that precision: computing float32 under that name would be a wrong result.
            raise InputError(
                f"precision={precision!r}: the MoEE encoder returns float32 vectors only; drop precision from "
                "encode_kwargs (int8 weights are MoEEmbedder.from_pretrained(..., int8=True), filed as such)"
            )
        texts: list[str] = []
        for batch in inputs:
            if "text" not in batch:
                raise InputError(f"MoEE embeds text only; this batch has no 'text' field (fields: {sorted(batch)})")
            texts.extend(batch["text"])
        # Without a prompt and without BOS/EOS an empty text gives the model no token at all: its vector is zero
        # (cosine 0 to everything) instead of an error.
        kind_of_text = getattr(prompt_type, "value", prompt_type)  # mteb's PromptType: "query" or "document"
        show = bool(kwargs.get("show_progress_bar")) if self.show_progress_bar is None else self.show_progress_bar
        if self.mode == "official":
            return self._encode_official(texts, task_metadata, kind_of_text, show)
        tokenizer = self.embedder.tokenizer
        prompt = named_prompt(self.prompts, kind_of_text, None, None) if kind_of_text in self.prompts else self.prompt
        no_tokens = resolve_prompt(prompt) == PLACEHOLDER and not (tokenizer.adds_bos or tokenizer.adds_eos)
        keep = [i for i, text in enumerate(texts) if not (no_tokens and text == "")]
        vectors = np.zeros((len(texts), self.embedder.dimension(self.kind, self.feature_options["rw_layers"])), np.float32)
        result = pipeline.run(self.embedder, [texts[i] for i in keep], self.spec.replace(prompt=prompt),
                              batch_size=self.batch_size or kwargs.get("batch_size"), show_progress_bar=show)
        vectors[keep] = result.vectors
        self.num_truncated += result.report.num_truncated
        return vectors

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity matrix [len(embeddings1), len(embeddings2)] (a zero vector scores 0); in the official
        mode's moee-sum the dot product, their cos(HS) + alpha cos(RW)."""
        a, b = self._scored(embeddings1), self._scored(embeddings2)
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """similarity() of each row of embeddings1 with the same row of embeddings2."""
        return (self._scored(embeddings1) * self._scored(embeddings2)).sum(-1)

    def _scored(self, x) -> torch.Tensor:
        if self.mode == "official" and get_kind(self.kind).uses_alpha:  # parts already unit (or zero) and weighted
            x = torch.as_tensor(x).float()
            return x.reshape(1, -1) if x.ndim == 1 else x
        return _unit_rows(x)

    @property
    def mteb_model_meta(self):
        if self._meta is None:
            self._meta = self._build_meta()
        return self._meta

    # ---------------------------------------------------------------- metadata

    def _build_meta(self):
        require_mteb()
        from mteb.models.model_meta import ModelMeta

        args = self.embedder.args
        model = self.embedder.model
        total, active = args.parameter_counts()
        checkpoint, revision = checkpoint_identity(model.source_dir)
        weight_bytes = (sum(p.numel() * p.element_size() for p in model.parameters()) if not self.embedder.streamed
                        else max(model.layer_bytes))  # streamed: one layer is resident at a time
        return ModelMeta(
            loader=None,  # built in Python from an MoEEmbedder, not loaded by name
            # mteb files results under name / revision / experiment: the checkpoint itself, not its folder's name.
            name=f"moee-ref/{checkpoint}-{self.kind}",
            revision=revision,
            release_date=None,
            languages=None,
            n_parameters=total,
            n_active_parameters_override=active,
            memory_usage_mb=round(weight_bytes / 2**20, 2),
            max_tokens=self.feature_options["max_length"] or args.max_position_embeddings,
            embed_dim=self.embedder.dimension(self.kind, self.feature_options["rw_layers"]),
            license=None,
            open_weights=None,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch"],
            reference=REFERENCE,
            similarity_fn_name="cosine",
            use_instructions=self.instruction is not None if self.mode == "official" else self.template != PLACEHOLDER,
            training_datasets=None,
            experiment_kwargs=self._experiment_kwargs(),
        )

    def _experiment_kwargs(self) -> dict[str, Any]:
        """What distinguishes this configuration; mteb keeps each one's results in its own folder."""
        if self.mode == "official":
            return self._official_kwargs()
        names = {template: name for name, template in list_prompts()}
        prompt = names.get(self.template) or "custom-" + hashlib.sha256(self.template.encode()).hexdigest()[:8]
        settings: dict[str, Any] = {"prompt": prompt}
        for name in sorted(self.prompts):  # the query/document prompts change those vectors
            template = resolve_prompt(named_prompt(self.prompts, name, None, None))
            settings[f"{name}_prompt"] = names.get(template) or "custom-" + hashlib.sha256(template.encode()).hexdigest()[:8]
        uses_alpha = get_kind(self.kind).uses_alpha
        if uses_alpha:
            settings["alpha"] = self.alpha
        if self.standardizer is not None:
            settings["standardizer"] = standardizer_digest(self.standardizer)
        if self.normalize != uses_alpha:
            settings["normalize"] = self.normalize
        defaults = FeatureOptions(allow_empty=True, max_length=self.embedder.max_seq_length, truncation="right")
        for key, value in self.feature_options.items():
            if value != getattr(defaults, key):
                settings[key] = list(value) if key == "rw_layers" else value
        return {**settings, **self._computed()}

    def _official_kwargs(self) -> dict[str, Any]:
        instruction = self.instruction
        if instruction not in (None, "e5"):
            instruction = "custom-" + hashlib.sha256(instruction.encode()).hexdigest()[:8]
        settings: dict[str, Any] = {"mode": "official", "prompt": self.prompt or "none", "instruction": instruction or "none",
                                    "batch_size": self.batch_size}
        if get_kind(self.kind).uses_alpha:
            settings.update(alpha=self.alpha, ensemble=self.ensemble)
        return {**settings, **self._computed()}

    def _computed(self) -> dict[str, Any]:
        """How the vectors were computed: each of these changes them, beyond float32 rounding."""
        model = self.embedder.model
        settings: dict[str, Any] = {"dtype": str(model.dtype).removeprefix("torch.")}
        if model.int8:
            settings["int8"] = True
        if self.embedder.streamed:
            settings["streamed"] = True
        if not self.embedder.share_prefix:
            settings["whole_prompts"] = True
        return settings


def run_mteb(
    embedder: MoEEmbedder,
    task_names: Iterable[Any],
    *,
    kind: str = "moee-sum",
    prompt: str | None = None,
    alpha: float = 1.0,
    batch_size: int | None = None,
    output_dir: str | Path | None = None,
    languages: list[str] | None = None,
    standardizer=None,
    show_progress_bar: bool | None = None,
    prompts: dict[str, str] | None = None,
    mode: str = "default",
    instruction: str | None = None,
    ensemble: str | None = None,
    **feature_options,
) -> dict[str, dict[str, Any]]:
    """Evaluate one MoEE configuration on MTEB tasks; {task: {"main_score", "main_score_name", "scores", ...}}.

    task_names: MTEB task names and/or task objects (mteb AbsTask instances).
    output_dir: where mteb writes its per-task result files (none are written without it).
    languages: keep only the subsets of named tasks that are wholly in these languages (["eng"]: the
    English-only evaluation of the paper, e.g. STS17's en-en alone).
    standardizer, show_progress_bar, prompts, mode, instruction, ensemble: as MoEEEncoder takes them.
    """
    mteb = require_mteb()
    encoder = MoEEEncoder(embedder, kind, prompt=prompt, alpha=alpha, batch_size=batch_size, standardizer=standardizer,
                          show_progress_bar=show_progress_bar, prompts=prompts, mode=mode, instruction=instruction,
                          ensemble=ensemble, **feature_options)
    cache = mteb.ResultCache(output_dir) if output_dir is not None else None
    tasks = _tasks(mteb, task_names, languages)
    if mode == "official":
        _check_official(tasks, kind, instruction)  # before any data is loaded or text embedded
    unreachable = _unreachable_hub()  # probed once for all tasks: each probe may wait HUB_PROBE_SECONDS
    results = {}
    for task in tasks:
        # Load the data here (an aggregate task: that of its parts) to report a clear error when it is unavailable.
        to_load = [part for part in getattr(task.metadata, "tasks", None) or [task] if not part.data_loaded]
        for part in to_load:
            _load(part, unreachable)
        encoder.num_truncated = 0
        try:
            with _datasets_progress(bool(show_progress_bar)):  # its map/filter bars, one per split and subset
                outcome = mteb.evaluate(
                    encoder,
                    task,
                    cache=cache,
                    overwrite_strategy="always",
                    encode_kwargs={"batch_size": encoder.batch_size or embedder.batch_size},
                    co2_tracker=False,
                    show_progress_bar=False,
                )
        finally:
            for part in to_load:
                part.unload_data()
        (result,) = outcome.task_results
        results[task.metadata.name] = {
            "main_score": float(result.get_score()),
            "main_score_name": task.metadata.main_score,
            "task_type": task.metadata.type,
            "scores": _json_ready(result.scores),
            "evaluation_time": result.evaluation_time,
            "num_truncated": encoder.num_truncated,  # texts cut to max_length (the model's length by default)
        }
        if mode == "official":
            results[task.metadata.name].update(mode="official", batch_size=encoder.batch_size, instruction=instruction,
                                               ensemble=encoder.ensemble if kind == "moee-sum" else None)
    return results


def _check_official(tasks, kind: str, instruction) -> None:
    """The official mode's refusals, for all tasks at once."""
    if kind == "moee-sum":
        label_tasks = [t.metadata.name for t in tasks if t.metadata.type in ("Classification", "Clustering")]
        if label_tasks:
            raise InputError(
                f"mode='official' cannot reproduce moee-sum on {', '.join(label_tasks)}: for classification and clustering "
                "the authors' code averages the label ids that two models (one on HS, one on RW) predict, which is no "
                "embedding; use kind hs, rw or moee-concat there, or the default mode's moee-sum"
            )
    if instruction == "e5":
        for task in tasks:
            e5_instruction(task.metadata.name)  # an InputError naming the task when their table has none


def task_names_of(names: Iterable[str], task_types: Iterable[str] | None = None) -> list[str]:
    """Task names with "paper" expanded to PAPER_TASKS, kept to `task_types` when given (STS, Clustering, ...)."""
    expanded = []
    for name in names:
        expanded += [n for group in PAPER_TASKS.values() for n in group] if name == "paper" else [name]
    if task_types is None:
        return list(dict.fromkeys(expanded))
    types = list(task_types)
    mteb = require_mteb()
    known = sorted({task.metadata.type for task in mteb.get_tasks()})
    unknown = [t for t in types if t not in known]
    if unknown:
        raise InputError(f"unknown MTEB task type(s) {', '.join(map(repr, unknown))}; the paper's are {', '.join(PAPER_TASKS)}")
    kept = [n for n in dict.fromkeys(expanded) if _tasks(mteb, [n], None)[0].metadata.type in types]
    if not kept:
        raise InputError(f"none of the tasks {', '.join(expanded)} is of type {', '.join(types)}")
    return kept


def _tasks(mteb, task_names, languages) -> list:
    if isinstance(task_names, str):
        task_names = [task_names]
    tasks = []
    for item in task_names:
        if not isinstance(item, str):
            tasks.append(item)
            continue
        try:
            # The exclusive filter keeps the subsets wholly in `languages`; without languages it would keep none.
            tasks.append(mteb.get_task(item, languages=languages, exclusive_language_filter=languages is not None))
        except KeyError as exc:
            raise InputError(f"unknown MTEB task {item!r} ({exc.args[0] if exc.args else exc})") from None
        except ValueError as exc:
            raise InputError(f"MTEB task {item!r} has no subset in languages {languages} ({exc})") from None
    return tasks


def _load(task, endpoint: str | None) -> None:
    """Load a task's data; with the hub unreachable (its address in `endpoint`), from the local cache only, failing
    at once when it is not there (the datasets library would otherwise retry for half a minute per task)."""
    name = task.metadata.name
    path = task.metadata.dataset.get("path", "?")
    try:
        with _offline() if endpoint else nullcontext():
            task.load_data()
    except Exception as exc:  # network, hub and file errors come in many types
        why = (f"the hub ({endpoint}) cannot be reached and the local cache does not hold it" if endpoint
               else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise TaskDataError(
            f"MTEB task {name!r}: its data ({path} on the Hugging Face hub) cannot be loaded: {why}. "
            "Download it where there is network (it lands in the HF cache: HF_HOME / HF_DATASETS_CACHE) and copy "
            "that cache here; with HF_HUB_OFFLINE=1 set, the cache alone is used"
        ) from exc


def _unreachable_hub() -> str | None:
    """The hub's address when it does not answer a TCP connection within HUB_PROBE_SECONDS, else None
    (also None in offline mode, where the libraries already use the cache alone)."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError:
        return constants.ENDPOINT
    return None


@contextmanager
def _datasets_progress(show: bool):
    """The datasets library's progress bars on or off for a block (restored afterwards)."""
    from datasets.utils import logging as datasets_logging

    was = datasets_logging.is_progress_bar_enabled()
    (datasets_logging.enable_progress_bar if show else datasets_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (datasets_logging.enable_progress_bar if was else datasets_logging.disable_progress_bar)()


@contextmanager
def _offline():
    """Offline mode of huggingface_hub and datasets for one load (both read these flags at call time)."""
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _unit_rows(x) -> torch.Tensor:
    x = torch.as_tensor(x).float()
    return torch.nn.functional.normalize(x.reshape(1, -1) if x.ndim == 1 else x, dim=-1)


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
