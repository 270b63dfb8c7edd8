"""MoEE embeddings: hidden state (HS), routing weights (RW) and their combinations.

    embedder = MoEEmbedder.from_pretrained("allenai/OLMoE-1B-7B-0924")
    vectors = embedder.encode(texts, kind="moee-sum", prompt="prompteol", alpha=1.0)

Kinds (section 3 of the paper):
  hs           final normed hidden state at the last real token
  rw           router softmax at the last real token of every MoE layer, concatenated
  moee-concat  [HS; RW]
  moee-sum     [h/|h|; sqrt(alpha) r/|r|]: its dot product is cos(HS) + alpha cos(RW),
               the paper's weighted sum of similarities, as one vector per text

In the default mode an embedding depends only on its text and the options:
texts are sorted by length and batched to cut padding, and padding never
reaches real tokens. official.py's encode_official reproduces the authors'
public code instead.
"""

from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .alpha import AlphaChoice, select_alpha_supervised, select_alpha_unsupervised
from ..errors import InputError, NumericalError, UnknownOptionError
from ..kernels import packing_available
from ..kernels.precision import resolve_device, resolve_dtype
from .conventions import check_precision, check_prompts, converted, named_prompt, quantized, truncated
from .prompts import apply_prompt, list_prompts, resolve_prompt
from .standardize import Standardizer
from ..stats import cosine_rows
from ..tokenizer import Tokenizer, check_texts

KINDS = ("hs", "rw", "moee-concat", "moee-sum")
POOLINGS = ("last", "mean")
HS_LAYERS = ("last", "mean")
RW_VALUES = ("probs", "logits")
TRUNCATION = (None, "left", "right")
AUTO_PROGRESS_MIN_TEXTS = 256  # below this a progress bar is noise
MAX_AUTO_ALPHA_PAIRS = 20000
# Two plain texts: the tokens both their prompts start with are the template's shared prefix. A text can
# still merge into the prefix's last token (a quote after PromptEOL's quote), so each batch is checked.
PREFIX_PROBES = ("a", "1")
MIN_SHARED_PREFIX = 2  # a single shared token (a BOS) saves less than the prefix path adds


@dataclass
class FeatureOptions:
    """How HS and RW are read off the decoder (the paper's defaults; Table 5's ablations as options)."""

    prompt: str | None = None  # a built-in prompt name or a template with {text}
    pooling: str = "last"  # "last" real token, or "mean" over real tokens (HS and RW alike)
    hs_layer: str = "last"  # "last": final normed state; "mean": mean over every block's output
    rw_values: str = "probs"  # "probs" (softmax over all experts) or raw router "logits"
    rw_layers: Sequence[int] | None = None  # decoder layer indices of the MoE layers to use; None: all
    max_length: int | None = None  # token budget per text; None: the model's max_position_embeddings
    truncation: str | None = None  # None: over-long texts are an error; "left"/"right": the side cut off
    allow_empty: bool = False  # embed empty or whitespace-only texts (prompt only) instead of refusing them

    @classmethod
    def from_keywords(cls, keywords: dict, caller, **named) -> "FeatureOptions":
        """FeatureOptions from the keyword arguments of `caller` (a function), an unknown keyword refused by name."""
        fields = cls.__dataclass_fields__
        unknown = [key for key in keywords if key not in fields]
        if "mode" in unknown:
            raise UnknownOptionError(
                f"{caller.__name__}() takes no mode: the authors' computation is its own entry point, "
                "moee_ref.encode_official(embedder, texts, kind, ...)"
            )
        refuse_unknown(caller.__name__, unknown, [*keyword_names(caller), *(f for f in fields if f not in named)])
        return cls(**named, **keywords)

    def check(self) -> None:
        for name, value, valid in (
            ("pooling", self.pooling, POOLINGS),
            ("hs_layer", self.hs_layer, HS_LAYERS),
            ("rw_values", self.rw_values, RW_VALUES),
            ("truncation", self.truncation, TRUNCATION),
        ):
            if value not in valid:
                raise InputError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


@dataclass
class Features:
    """Per text, the two raw ingredients of every kind."""

    hs: np.ndarray  # [N, D] float32
    rw: np.ndarray  # [N, L_used * E] float32
    num_truncated: int = 0


@dataclass
class EncodeReport:
    """What the last encode() call did, for callers and the command line."""

    num_texts: int = 0
    num_truncated: int = 0
    alpha: float | None = None
    alpha_choice: AlphaChoice | None = None
    dtype: str | None = None  # the compute dtype that ran, and why it was chosen (kernels/precision.py)
    dtype_reason: str | None = None
    int8_kernel: str | None = None  # with int8: which matmuls ran (kernels/int8.py `integer_path`)
    prepared: str | None = None  # with int8: whether the prepared cache was read, built or not used (loading/prepared.py)
    batch_size: int | None = None  # the official mode's: its per-batch standardisation depends on it
    notes: list[str] = field(default_factory=list)


class MoEEmbedder:
    def __init__(self, model, tokenizer: Tokenizer, *, batch_size: int = 16, share_prefix: bool = True,
                 prompts: dict[str, str] | None = None, default_prompt_name: str | None = None):
        """share_prefix: run the tokens that every prompt of a template starts with once, and reuse their keys and
        values (exact under causal attention; see decoder/batch.py `SharedPrefix`). Only for last-token pooling.
        prompts, default_prompt_name: sentence-transformers' named prompts, e.g. {"query": "query: "} (prefixes,
        or templates with {text}, or built-in names), used by prompt_name=, encode_query and encode_document."""
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = positive_int("batch_size", batch_size)
        self.share_prefix = share_prefix
        self.prompts = check_prompts(prompts, default_prompt_name)
        self.default_prompt_name = default_prompt_name
        self.last_report = EncodeReport()

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        dtype: torch.dtype | str = "auto",
        *,
        int8: bool = False,
        memory_budget: str | int | None = None,
        spill_dir: str | None = None,
        packed: bool | None = None,
        memory_limit: str | int | None = None,
        device: str | torch.device = "auto",
        cache_dir: str | os.PathLike | None = None,
        prepared_cache: bool = True,
        **kwargs,
    ) -> "MoEEmbedder":
        """Load a checkpoint for embedding (without its LM head, which embeddings never use).

        dtype: "auto" (the default) computes in bf16 where this machine does bf16 natively
        and in float32 elsewhere (kernels/precision.py); float32 and float64 are the exact
        reference modes. HS and RW come out float32 whatever the compute dtype.
        memory_limit: the bytes this process may use, instead of what the system reports;
        a mode that needs more is refused before any weight is read (loading/memory.py).
        device: "auto" (the default: the first CUDA device where torch has one, else the CPU), "cpu",
        "cuda" or "cuda:N". The layer-streamed mode reads to the host and moves one layer at a time there.

        memory_budget (e.g. "8GB"): layer-streamed corpus mode for models larger
        than memory (loading/streamed.py); each encode() call then reads every layer once.
        int8: int8 attention and expert matrices (kernels/int8.py): int8 x int8 matmuls where this CPU
        runs them faster, else weight-only. Resident, the quantized layers are kept in a prepared cache and
        memory-mapped at the next load (loading/prepared.py): cache_dir is where (default $MOEE_CACHE_DIR,
        else ~/.cache/moee-ref), prepared_cache=False neither reads nor writes it. last_report says which ran.
        packed: float32 matrices packed for oneDNN (kernels/onednn.py); by default on
        wherever it applies (resident, float32, no int8, torch built with
        oneDNN). The streamed mode reads each layer once per corpus, for a few
        batches: packing it costs a pass over its weights that they do not win back.
        """
        # Before minutes of loading, not after: the rest goes to MoEEmbedder(...).
        takes = keyword_names(cls.from_pretrained) + keyword_names(cls.__init__)[2:]
        refuse_unknown("from_pretrained", [k for k in kwargs if k not in takes], takes)
        device = resolve_device(device)
        dtype, reason = resolve_dtype(dtype, device)
        if packed is None:
            packed = memory_budget is None and dtype == torch.float32 and not int8 and packing_available() and device.type == "cpu"
        if memory_budget is not None:
            from ..loading.streamed import StreamedModel

            model = StreamedModel(source, dtype, memory_budget=memory_budget, int8=int8, spill_dir=spill_dir, packed=packed,
                                  memory_limit=memory_limit, device=device)
        else:
            from ..loading.checkpoint import load_model

            model = load_model(source, dtype=dtype, int8=int8, lm_head=False, packed=packed, memory_limit=memory_limit, device=device,
                               cache_dir=cache_dir, prepared_cache=prepared_cache)
        model.dtype_reason = reason
        return cls(model, Tokenizer.from_dir(model.source_dir), **kwargs)

    @property
    def streamed(self) -> bool:
        return not isinstance(self.model, torch.nn.Module)

    @property
    def args(self):
        return self.model.args

    @staticmethod
    def list_prompts() -> list[tuple[str, str]]:
        return list_prompts()

    def dimension(self, kind: str, rw_layers: Sequence[int] | None = None) -> int:
        """Width of the vectors encode() returns for kind."""
        check_kind(kind)
        hs = self.args.hidden_size
        rw = len(self._rw_layer_positions(rw_layers)) * self.args.num_experts
        return {"hs": hs, "rw": rw}.get(kind, hs + rw)

    # ------------------------------------------------------------------ encode

    def encode(
        self,
        texts: Sequence[str],
        kind: str = "moee-sum",
        *,
        prompt: str | None = None,
        alpha: float | str | AlphaChoice = 1.0,
        alpha_pairs: tuple[Sequence[str], Sequence[str]] | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
        truncation: str | None = None,
        normalize: bool = False,
        standardizer: Standardizer | Sequence[Standardizer] | None = None,
        show_progress_bar: bool | None = None,
        normalize_embeddings: bool = False,
        prompt_name: str | None = None,
        truncate_dim: int | None = None,
        precision: str = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        **feature_options,
    ) -> np.ndarray:
        """Embed texts; returns float32 [len(texts), dim] in input order (one text as a str: its [dim] vector).

        texts: a list or tuple of str, a 1-D numpy array of str, or a single str (as sentence-transformers takes them).
        alpha (moee-sum only): a number >= 0; "auto" for the label-free choice
        of section 3.3 over the unlabeled pairs `alpha_pairs` (or, without
        them, over pairs among `texts`); or an AlphaChoice from select_alpha().
        standardizer: fitted Standardizer(s) for the "hs" and/or "rw" component,
        applied before the components are combined.
        normalize / normalize_embeddings (sentence-transformers' spelling): scale each output vector to unit length.
        feature_options: the other fields of FeatureOptions (pooling, hs_layer, rw_values, rw_layers, allow_empty).
        As sentence-transformers has them (embedding/conventions.py): prompt_name (a key of `prompts`),
        truncate_dim (the first d dimensions, before normalizing), precision ("float32", "int8", "uint8",
        "binary", "ubinary"), convert_to_tensor (one torch tensor), convert_to_numpy=False (a list of row tensors).
        The authors' own computation is moee_ref.encode_official, not an option here.
        """
        check_kind(kind)
        single = isinstance(texts, str)
        if single:
            texts = [texts]
        elif isinstance(texts, np.ndarray) and texts.ndim == 1 and texts.dtype.kind in "UO":
            texts = texts.tolist()  # each item is still checked to be a str
        prompt = named_prompt(self.prompts, prompt_name, prompt, self.default_prompt_name)
        options = FeatureOptions.from_keywords(feature_options, self.encode, prompt=prompt, max_length=max_length, truncation=truncation)
        check_precision(precision)  # before the work, not after
        feats = self.features(texts, options, batch_size=batch_size, show_progress_bar=show_progress_bar)
        vectors = self.vectors_from_features(feats, kind, options, alpha=alpha, alpha_pairs=alpha_pairs, batch_size=batch_size,
                                             standardizer=standardizer)
        vectors = truncated(vectors, truncate_dim)
        if normalize or normalize_embeddings:
            vectors = normalize_rows(vectors)
        vectors = quantized(vectors, precision)
        return converted(vectors[0] if single else vectors, convert_to_numpy, convert_to_tensor)

    def encode_query(self, texts, kind: str = "moee-sum", **options):
        """encode() with prompts["query"] where this embedder has one (sentence-transformers' encode_query)."""
        return self._encode_as("query", texts, kind, options)

    def encode_document(self, texts, kind: str = "moee-sum", **options):
        """encode() with the first of prompts["document"], ["passage"], ["corpus"] this embedder has."""
        return self._encode_as(("document", "passage", "corpus"), texts, kind, options)

    def _encode_as(self, names, texts, kind, options):
        names = (names,) if isinstance(names, str) else names
        if "prompt" not in options and "prompt_name" not in options:
            options["prompt_name"] = next((n for n in names if n in self.prompts), None)
        return self.encode(texts, kind, **options)

    def vectors_from_features(
        self, feats: Features, kind: str, options: FeatureOptions, *, alpha=1.0, alpha_pairs=None, batch_size: int | None = None,
        normalize: bool = False, standardizer=None,
    ) -> np.ndarray:
        """encode()'s vectors from the features() of all its texts (corpus.py computes those chunk by chunk).
        Row by row except alpha='auto', which is chosen over the pairs among all the rows."""
        check_kind(kind)
        report = EncodeReport(num_texts=len(feats.hs), num_truncated=feats.num_truncated)
        if feats.num_truncated:
            report.notes.append(f"{feats.num_truncated} of {len(feats.hs)} texts were truncated to max_length")
        hs, rw = apply_standardizers(feats.hs, feats.rw, standardizer)
        alpha_value = None
        if kind == "moee-sum":
            alpha_value, report.alpha_choice = self._resolve_alpha(alpha, alpha_pairs, hs, rw, options, batch_size, standardizer)
            report.alpha = alpha_value
        report.dtype = str(self.model.dtype).removeprefix("torch.")
        report.dtype_reason = getattr(self.model, "dtype_reason", None)
        report.int8_kernel, report.prepared = getattr(self.model, "int8_kernel", None), getattr(self.model, "prepared", None)
        self.last_report = report
        vectors = combine(hs, rw, kind, alpha_value)
        return normalize_rows(vectors) if normalize else vectors

    def get_sentence_embedding_dimension(self, kind: str = "moee-sum") -> int:
        """Width of encode()'s vectors for `kind` (sentence-transformers' name for dimension())."""
        return self.dimension(kind)

    @property
    def max_seq_length(self) -> int:
        """The longest input in tokens, prompt included: the model's max_position_embeddings."""
        return self.args.max_position_embeddings

    similarity_fn_name = "cosine"  # what similarity() computes, as sentence-transformers names it

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity matrix [len(a), len(b)] of two sets of embeddings (a zero vector scores 0)."""
        return similarity(a, b)

    def similarity_pairwise(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine of each row of a with the same row of b, [N] (a zero vector scores 0)."""
        return cosine_rows(a, b).astype(np.float32)

    # ------------------------------------------------------------- ingredients

    def features(
        self,
        texts: Sequence[str],
        options: FeatureOptions | None = None,
        *,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        row_names: Sequence[int] | None = None,
    ) -> Features:
        """HS and RW for every text, computed batch by batch in length order and returned in input order.
        row_names: the index an error names each text by (corpus.py's chunks: its row in the whole corpus)."""
        options = options or FeatureOptions()
        options.check()
        texts = _check_texts(texts, options.allow_empty)
        batch_size = positive_int("batch_size", self.batch_size if batch_size is None else batch_size)
        rw_positions = self._rw_layer_positions(options.rw_layers)
        if not texts:
            d_rw = len(rw_positions) * self.args.num_experts
            return Features(np.zeros((0, self.args.hidden_size), np.float32), np.zeros((0, d_rw), np.float32))
        template, sequences, too_long = self._sequences(texts, options)

        hs = np.zeros((len(texts), self.args.hidden_size), np.float32)
        rw = np.zeros((len(texts), len(rw_positions) * self.args.num_experts), np.float32)
        # A text that gives no token at all (empty, no prompt, no BOS; only with allow_empty) keeps a zero
        # vector: cosine 0 to everything, never NaN.
        order = _length_order(sequences)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        prefix = shared_prefix_ids(self.tokenizer, template) if self.share_prefix and options.pooling == "last" else None
        batch_sequences, continues = [], []
        for rows in batches:
            seqs = [sequences[i] for i in rows]
            # A text can merge with the prompt's shared prefix into other tokens: such a batch runs whole.
            shared = prefix is not None and all(starts_with(seq, prefix) for seq in seqs)
            batch_sequences.append([seq[len(prefix) :] for seq in seqs] if shared else seqs)
            continues.append(shared)
        if options.hs_layer == "mean" and not self.model.layer_states_available:
            raise InputError("hs_layer='mean' is not available in the layer-streamed mode; use hs_layer='last'")
        padded = [self.tokenizer.pad(seqs, padding_side="left") for seqs in batch_sequences]
        pooled = self._run_batches(
            [(batch.input_ids, batch.attention_mask) for batch in padded], options, rw_positions,
            show_progress_bar=show_progress(show_progress_bar, len(texts)), prefix_ids=None if prefix is None else list(prefix),
            continues=continues, texts_of=batches if row_names is None else [[row_names[i] for i in rows] for rows in batches],
        )
        for rows, (batch_hs, batch_rw) in zip(batches, pooled):
            hs[rows], rw[rows] = batch_hs, batch_rw
        return Features(hs, rw, num_truncated=len(too_long))

    def corpus_order(self, texts: Sequence[str], options: FeatureOptions) -> tuple[list[int], int]:
        """(rows, number truncated): the texts' indices in the order features() batches them, texts that give no
        token left out, after the checks features() makes (empty or over-long texts refused).

        features() of the texts at rows[i:j], in that order, batches them exactly as features() of all the texts
        batches that stretch when i and j are multiples of the batch size: corpus.py computes a corpus in such
        chunks with the very batches, so the very vectors, of one call."""
        options.check()
        texts = _check_texts(texts, options.allow_empty)
        if not texts:
            return [], 0
        _, sequences, too_long = self._sequences(texts, options)
        return _length_order(sequences), len(too_long)

    def _sequences(self, texts: list[str], options: FeatureOptions) -> tuple[str, list[list[int]], list[int]]:
        """(template, token ids of every prompted text cut to max_length, indices of the texts that were cut)."""
        template = resolve_prompt(options.prompt)
        limit = self.args.max_position_embeddings
        max_length = options.max_length if options.max_length is not None else limit
        if options.max_length is not None and (
            isinstance(options.max_length, bool) or not isinstance(options.max_length, int) or not 1 <= options.max_length <= limit
        ):
            raise InputError(f"max_length={options.max_length} must lie in [1, {limit}] (the model's max_position_embeddings)")
        prompted = [apply_prompt(template, text) for text in texts]
        sequences, _ = self.tokenizer.tokenize(prompted, allow_empty=options.allow_empty)
        too_long = [i for i, seq in enumerate(sequences) if len(seq) > max_length]
        if too_long and options.truncation is None:
            raise InputError(
                f"{len(too_long)} text(s) exceed max_length={max_length} tokens (first at index {too_long[0]}, "
                f"{len(sequences[too_long[0]])} tokens); pass truncation='right' (keep the beginning) or 'left' (keep the end)"
            )
        for i in too_long:
            sequences[i] = self._truncate_inside_prompt(template, texts[i], max_length, options.truncation, i)
        return template, sequences, too_long

    def _run_batches(self, batches, options: FeatureOptions, rw_positions: list[int], *, position_ids=None,
                     show_progress_bar: bool = False, prefix_ids=None, continues=None, texts_of=None):
        """(HS, RW) per padded (input_ids, attention_mask) batch: the one way batches reach the model, resident or
        layer-streamed (which runs them all through each layer in turn). texts_of: each batch's text indices,
        for the error that non-finite outputs raise."""
        work = [(ids, mask, read_positions(mask, options)) for ids, mask in batches]
        with torch.inference_mode():
            outputs = self.model.run(
                work, position_ids=position_ids, show_progress_bar=show_progress_bar, prefix_ids=prefix_ids,
                continues=continues, return_layer_states=options.hs_layer == "mean",
            )
            outputs = list(outputs)  # first: the model's batches run to their end, and its progress bar closes
            check_finite(outputs, texts_of, self.model.dtype)
            return [pool(out, mask, options, rw_positions) for out, (_, mask) in zip(outputs, batches)]

    def _truncate_inside_prompt(self, template: str, text: str, max_length: int, side: str, index: int) -> list[int]:
        """Token ids of the prompt around the longest cut of `text` that fits max_length.

        The text is cut, never the prompt: PromptEOL's closing words are what
        the last token reads. Cuts are made on the text's own tokens (the start
        kept for side 'right', the end for 'left') and checked by tokenizing
        the whole prompt again, since tokens at the seams can merge.
        """
        text_ids = self.tokenizer.encode(text, add_special_tokens=False) if text else []

        def prompt_ids(keep: int) -> list[int]:
            piece = text_ids[:keep] if side == "right" else text_ids[len(text_ids) - keep :]
            return self.tokenizer.tokenize([apply_prompt(template, self.tokenizer.decode(piece) if keep else "")], allow_empty=True)[0][0]

        if len(prompt_ids(0)) > max_length:
            raise InputError(
                f"text at index {index}: the prompt alone takes {len(prompt_ids(0))} tokens, more than max_length={max_length}; "
                "raise max_length or use a shorter prompt"
            )
        low, high = 0, len(text_ids)  # prompt_ids(low) fits; find the largest keep that fits
        while low < high:
            mid = (low + high + 1) // 2
            if len(prompt_ids(mid)) <= max_length:
                low = mid
            else:
                high = mid - 1
        return prompt_ids(low)

    def run_batch(self, input_ids, attention_mask, options: FeatureOptions, rw_positions: list[int], position_ids=None):
        """(HS [B, D], RW [B, L_used * E]) as float32 numpy for one padded batch."""
        if self.streamed:
            # One batch at a time would read every layer of the checkpoint again for each batch.
            raise InputError("run_batch needs a resident model; the layer-streamed mode works on whole corpora (features())")
        positions = None if position_ids is None else [position_ids]
        return self._run_batches([(input_ids, attention_mask)], options, rw_positions, position_ids=positions)[0]

    def _rw_layer_positions(self, rw_layers: Sequence[int] | None) -> list[int]:
        """Indices into the routing stack for the requested decoder layers (all MoE layers by default)."""
        moe = list(self.args.moe_layers)
        if rw_layers is None:
            return list(range(len(moe)))
        if isinstance(rw_layers, (str, bytes)) or not len(rw_layers):
            raise InputError(f"rw_layers must be a non-empty list of MoE layer indices; the MoE layers are {moe}")
        bad = [layer for layer in rw_layers if layer not in moe]
        if bad:
            raise InputError(f"rw_layers {bad} are not MoE layers of this model; choose from {moe}")
        return [moe.index(layer) for layer in rw_layers]

    # ------------------------------------------------------------------- alpha

    def select_alpha(
        self,
        texts_a: Sequence[str],
        texts_b: Sequence[str],
        gold: Sequence[float] | None = None,
        *,
        standardizer: Standardizer | Sequence[Standardizer] | None = None,
        batch_size: int | None = None,
        **feature_options,
    ) -> AlphaChoice:
        """alpha for moee-sum from pairs: label-free without gold (section 3.3), else against the gold scores."""
        if len(texts_a) != len(texts_b):
            raise InputError(f"texts_a has {len(texts_a)} texts but texts_b has {len(texts_b)}; pairs need equal lengths")
        options = FeatureOptions.from_keywords(feature_options, self.select_alpha)
        feats = self.features(list(texts_a) + list(texts_b), options, batch_size=batch_size)
        hs, rw = apply_standardizers(feats.hs, feats.rw, standardizer)
        n = len(texts_a)
        return choose_alpha(cosine_rows(hs[:n], hs[n:]), cosine_rows(rw[:n], rw[n:]), gold)

    def _resolve_alpha(self, alpha, alpha_pairs, hs, rw, options, batch_size, standardizer=None) -> tuple[float, AlphaChoice | None]:
        if alpha_pairs is not None:
            if alpha != "auto":
                raise InputError("alpha_pairs are the unlabeled pairs for alpha='auto'; with a fixed alpha drop them")
            if not isinstance(alpha_pairs, (tuple, list)) or len(alpha_pairs) != 2:
                raise InputError("alpha_pairs must be (texts_a, texts_b): two lists of the same length")
        if isinstance(alpha, AlphaChoice):
            return _check_alpha(alpha.alpha), alpha
        if isinstance(alpha, str):
            if alpha != "auto":
                raise InputError(f"alpha={alpha!r} is not valid; give a number >= 0, 'auto' or an AlphaChoice")
            if alpha_pairs is not None:
                a, b = alpha_pairs
                choice = self.select_alpha(a, b, standardizer=standardizer, batch_size=batch_size, **_options_dict(options))
            else:
                choice = alpha_over_all_pairs(hs, rw)
            return choice.alpha, choice
        return _check_alpha(alpha), None

    # ---------------------------------------------------------- standardisation

    def fit_standardizer(
        self, texts: Sequence[str], component: str = "rw", *, batch_size: int | None = None, **feature_options
    ) -> Standardizer:
        """Per-feature statistics of one component ("hs" or "rw") over a corpus, to save and reuse."""
        if component not in ("hs", "rw"):
            raise InputError(f"component={component!r} is not valid; choose 'hs' or 'rw'")
        feats = self.features(texts, FeatureOptions.from_keywords(feature_options, self.fit_standardizer), batch_size=batch_size)
        return Standardizer.fit(feats.hs if component == "hs" else feats.rw, kind=component)


# ----------------------------------------------------------------------------
# Pure functions on features, shared with the command line and the evaluators.


def pool(out, attention_mask: torch.Tensor, options: FeatureOptions, rw_positions: list[int]):
    """(HS, RW) per row, float32 numpy, from one batch's decoder output.

    With pooling "last" the decoder was asked for the last real position only
    (keep_positions), so its outputs have one position per row.
    """
    with torch.inference_mode():
        if options.hs_layer == "mean":
            # Mean over the output of every block, the last one taken after the final norm.
            states = list(out.layer_hidden_states[:-1]) + [out.hidden_states]
            hidden = torch.stack(states).float().mean(0)
        else:
            hidden = out.hidden_states.float()
        routing = out.router_probs if options.rw_values == "probs" else out.router_logits
        routing = routing[:, rw_positions]  # [B, L_used, T or 1, E]
        if options.pooling == "last":
            hs, rw = hidden[:, 0], routing[:, :, 0]
        else:
            mask = attention_mask.to(hidden.device, torch.float32)
            weights = mask / mask.sum(-1, keepdim=True)
            hs = torch.einsum("bt,btd->bd", weights, hidden)
            rw = torch.einsum("bt,blte->ble", weights, routing)
        return hs.cpu().numpy().astype(np.float32), rw.reshape(len(rw), -1).cpu().numpy().astype(np.float32)


def check_finite(outputs, texts_of: list[list[int]] | None, dtype: torch.dtype) -> None:
    """NumericalError when decoder outputs hold NaN or infinity, naming the first such text in input order and
    the first MoE layer whose router sees it. Checked on the outputs read (a few positions per text), never by
    scanning weights: a NaN row would otherwise become a zero vector once normalised, and pass as a result."""
    found = []  # (text index, batch, row)
    for number, out in enumerate(outputs):
        rows = ~torch.isfinite(out.hidden_states).flatten(1).all(-1) | ~torch.isfinite(out.router_logits).flatten(1).all(-1)
        for row in rows.nonzero().flatten().tolist():
            found.append((row if texts_of is None else texts_of[number][row], number, row))
    if not found:
        return
    text, number, row = min(found)
    out = outputs[number]
    which = f"the text at index {text}" if texts_of is not None else f"row {row} of the batch"
    bad_routers = (~torch.isfinite(out.router_logits[row]).flatten(1).all(-1)).nonzero().flatten().tolist()
    moe_layers = out.moe_layers
    if bad_routers:
        first = bad_routers[0]
        where = f"they first appear at the router of decoder layer {moe_layers[first]}" + (
            f" (the {first} MoE layer router(s) before it are finite)" if first else " (the first MoE layer)")
    else:
        where = f"the routers are finite: they appear after the router of decoder layer {moe_layers[-1]} (its experts, a later layer or the final norm)"
    overflow = " or, in a 16-bit dtype, an overflow (try dtype float32)" if dtype in (torch.bfloat16, torch.float16) else ""
    raise NumericalError(
        f"non-finite values (NaN or infinity) in the model's outputs for {which}: {where}. "
        f"The cause is the checkpoint: damaged weights, a wrong config.json (rms_norm_eps, rope_theta){overflow}"
    )


def combine(hs: np.ndarray, rw: np.ndarray, kind: str, alpha: float | None = None) -> np.ndarray:
    """The vectors of `kind` from the HS and RW components."""
    check_kind(kind)
    if kind == "hs":
        return np.ascontiguousarray(hs, dtype=np.float32)
    if kind == "rw":
        return np.ascontiguousarray(rw, dtype=np.float32)
    if kind == "moee-concat":
        return np.concatenate([hs, rw], axis=1).astype(np.float32)
    if alpha is None:
        raise InputError("moee-sum needs alpha")
    return np.concatenate([normalize_rows(hs), np.sqrt(alpha) * normalize_rows(rw)], axis=1).astype(np.float32)


def apply_standardizers(hs, rw, standardizer):
    """Apply fitted Standardizer(s) to their component ("hs" or "rw", by their kind)."""
    if standardizer is None:
        return hs, rw
    items = [standardizer] if isinstance(standardizer, Standardizer) else list(standardizer)
    seen = set()
    for item in items:
        if not isinstance(item, Standardizer):
            raise InputError(f"standardizer must be a Standardizer (or a list of them), got {type(item).__name__}")
        if item.kind not in ("hs", "rw") or item.kind in seen:
            raise InputError(
                f"standardizer kind {item.kind!r}: expected one standardizer per component, of kind 'hs' or 'rw' "
                "(fit them with MoEEmbedder.fit_standardizer)"
            )
        seen.add(item.kind)
        if item.kind == "hs":
            hs = item.transform(hs)
        else:
            rw = item.transform(rw)
    return hs, rw


def choose_alpha(sim_hs: np.ndarray, sim_rw: np.ndarray, gold=None) -> AlphaChoice:
    if gold is None:
        return select_alpha_unsupervised(sim_hs, sim_rw)
    return select_alpha_supervised(sim_hs, sim_rw, np.asarray(gold, dtype=np.float64))


def alpha_over_all_pairs(hs: np.ndarray, rw: np.ndarray, seed: int = 0) -> AlphaChoice:
    """Label-free alpha over pairs among the texts themselves (all pairs, or a fixed-seed sample of them)."""
    n = len(hs)
    if n < 3:
        raise InputError("alpha='auto' needs at least 3 texts (or alpha_pairs) to compare similarities")
    first, second = np.triu_indices(n, k=1)
    if len(first) > MAX_AUTO_ALPHA_PAIRS:
        pick = np.random.default_rng(seed).choice(len(first), MAX_AUTO_ALPHA_PAIRS, replace=False)
        first, second = first[np.sort(pick)], second[np.sort(pick)]
    return select_alpha_unsupervised(cosine_rows(hs[first], hs[second]), cosine_rows(rw[first], rw[second]))


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape[1] != b.shape[1]:
        raise InputError(f"cannot compare embeddings of width {a.shape[1]} and {b.shape[1]}")
    return (normalize_rows(a) @ normalize_rows(b).T).astype(np.float32)


def read_positions(attention_mask: torch.Tensor, options: FeatureOptions) -> torch.Tensor | None:
    """The positions pooling reads, for keep_positions: the last real token, or all (None) for mean pooling."""
    return last_real_position(attention_mask)[:, None] if options.pooling == "last" else None


def shared_prefix_ids(tokenizer: Tokenizer, template: str) -> tuple[int, ...] | None:
    """The tokens every prompt of `template` starts with, whatever the text (None: too few to share)."""
    probes = [tokenizer.tokenize([apply_prompt(template, probe)], allow_empty=True)[0][0] for probe in PREFIX_PROBES]
    ids = common_prefix(probes)
    return ids if len(ids) >= MIN_SHARED_PREFIX else None


def common_prefix(sequences: list[list[int]]) -> tuple[int, ...]:
    length = 0
    while all(len(seq) > length and seq[length] == sequences[0][length] for seq in sequences):
        length += 1
    return tuple(sequences[0][:length])


def starts_with(sequence: list[int], prefix: tuple[int, ...]) -> bool:
    """sequence begins with prefix and has at least one token after it (the one pooling reads)."""
    return len(sequence) > len(prefix) and tuple(sequence[: len(prefix)]) == prefix


def last_real_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding."""
    length = attention_mask.shape[1]
    return length - 1 - attention_mask.flip(-1).argmax(-1)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InputError(f"kind={kind!r} is not valid; choose one of {', '.join(KINDS)}")


def _check_texts(texts, allow_empty: bool) -> list[str]:
    check_texts(texts)
    for index, text in enumerate(texts):
        if not allow_empty and not text.strip():
            raise InputError(
                f"text at index {index} is empty or whitespace only; remove it, or pass allow_empty=True "
                "(--allow-empty on the command line) to embed the prompt around an empty text"
            )
    return list(texts)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha < 0:
        raise InputError(f"alpha must be a finite number >= 0, 'auto' or an AlphaChoice; got {alpha!r}")
    return float(alpha)


def keyword_names(function) -> list[str]:
    """The named parameters of a function or method (not self, not *args or **kwargs)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds and p.name != "self"]


def refuse_unknown(caller: str, unknown, known: list[str]) -> None:
    """UnknownOptionError naming each unknown keyword (with the closest known one) and everything `caller` takes."""
    unknown = list(unknown)
    if not unknown:
        return
    named = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, known, n=1)) else repr(u) for u in unknown]
    raise UnknownOptionError(f"{caller}() got unknown option(s) {', '.join(named)}; it takes {', '.join(known)}")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _options_dict(options: FeatureOptions) -> dict:
    return {k: getattr(options, k) for k in FeatureOptions.__dataclass_fields__}


def _length_order(sequences: list[list[int]]) -> list[int]:
    """Longest first: the first batch shows at once whether memory suffices, and similar lengths share a batch.
    Equal lengths stay in input order (a stable sort), so any run of this order sorts to itself again."""
    return sorted((i for i in range(len(sequences)) if sequences[i]), key=lambda i: -len(sequences[i]))


def show_progress(show: bool | None, num_texts: int) -> bool:
    return num_texts >= AUTO_PROGRESS_MIN_TEXTS if show is None else show
