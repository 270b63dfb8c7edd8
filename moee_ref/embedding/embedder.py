"""MoEE embeddings: hidden state (HS), routing weights (RW) and their combinations.

    embedder = MoEEmbedder.from_pretrained("allenai/OLMoE-1B-7B-0924")
    vectors = embedder.encode(texts, kind="moee-sum", prompt="prompteol", alpha=1.0)

MoEEmbedder holds the model and tokenizer and computes each text's HS and RW (features()); encode()
builds an EmbedSpec (spec.py) and runs the pipeline (pipeline.py). The kinds and how HS and RW are
pooled and combined are in kinds.py.

In the default mode an embedding depends only on its text and the options:
texts are sorted by length and batched to cut padding, and padding never
reaches real tokens. official.py's encode_official reproduces the authors'
public code instead.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from . import pipeline
from .alpha import AlphaChoice
from .conventions import (
    check_precision, check_prompts, check_similarity_fn_name, check_truncate_dim, converted, named_prompt, quantized,
    similarity_matrix, similarity_rows, truncated,
)
from .kinds import KINDS, combine, get_kind, normalize_rows, pool
from .pipeline import EncodeReport, Features, alpha_over_all_pairs, apply_standardizers, choose_alpha  # noqa: F401  (their API)
from .prompts import apply_prompt, list_prompts, resolve_prompt
from .spec import (  # noqa: F401  (HS_LAYERS, POOLINGS, RW_VALUES: importable here as before)
    HS_LAYERS, POOLINGS, RW_VALUES, EmbedSpec, FeatureOptions, keyword_names, positive_int, refuse_unknown,
)
from .standardize import Standardizer
from .stats import cosine_rows
from ..errors import InputError, NumericalError
from ..kernels import packing_available
from ..kernels.precision import resolve_device, resolve_dtype
from ..loading.tokenizer import Tokenizer, check_texts
from ..progress import show_progress

# Two plain texts: the tokens both their prompts start with are the template's shared prefix. A text can
# still merge into the prefix's last token (a quote after PromptEOL's quote), so each batch is checked.
PREFIX_PROBES = ("a", "1")
MIN_SHARED_PREFIX = 2  # a single shared token (a BOS) saves less than the prefix path adds


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
        self.load_note: str | None = None  # from_pretrained(fit="auto"): the mode chosen instead of the one asked for
        self.config: EmbedSpec | None = None  # from_pretrained(config=): the settings encode() defaults to
        self._max_seq_length: int | None = None  # None: the model's max_position_embeddings
        self._similarity_fn_name = "cosine"

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
        fit: str | None = None,
        config=None,
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
        fit: "auto" chooses the mode from this process's memory when neither int8 nor memory_budget is given (on
        the CPU): the dtype resident where it fits, else int8, else layer-streamed (loading/checkpoint.py
        `choose_mode`), before any weight is read; `load_note` then says what was chosen and why. None: the mode
        asked for, or InsufficientMemoryError naming those that fit.
        packed: float32 matrices packed for oneDNN (kernels/onednn.py); by default on
        wherever it applies (resident, float32, no int8, torch built with
        oneDNN). The streamed mode reads each layer once per corpus, for a few
        batches: packing it costs a pass over its weights that they do not win back.
        config: a saved embedding configuration (`moee embed --save-config`: a path, its dict, or an EmbedSpec);
        encode() then takes every setting left at its default from it (kind, prompt, alpha as a number,
        standardizers, feature options), so a query gets the vectors of the corpus job that wrote it.
        """
        # Before minutes of loading, not after: the rest goes to MoEEmbedder(...).
        takes = keyword_names(cls.from_pretrained) + keyword_names(cls.__init__)[2:]
        refuse_unknown("from_pretrained", [k for k in kwargs if k not in takes], takes)
        if fit not in (None, "auto"):
            raise InputError(f"fit={fit!r} is not valid; choose 'auto' (the first mode that fits memory) or None")
        if config is not None:
            from .spec import load_config

            config = load_config(config)  # before minutes of loading
        device = resolve_device(device)
        dtype, reason = resolve_dtype(dtype, device)
        note = None
        if fit == "auto" and not int8 and memory_budget is None and device.type == "cpu":
            from ..loading.checkpoint import choose_mode

            mode, note = choose_mode(source, dtype, memory_limit)
            int8, memory_budget = mode.int8, mode.memory_budget
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
        embedder = cls(model, Tokenizer.from_dir(model.source_dir), **kwargs)
        embedder.load_note = note
        embedder.config = config
        return embedder

    @property
    def streamed(self) -> bool:
        return not isinstance(self.model, torch.nn.Module)

    @property
    def args(self):
        return self.model.args

    @property
    def device(self) -> torch.device:
        """Where the model computes."""
        return self.model.device

    def to(self, device: str | torch.device) -> "MoEEmbedder":
        """Move the model to `device` ("cpu", "cuda", "cuda:N"; checked as from_pretrained checks it); returns self.
        The layer-streamed mode computes each layer there from then on; oneDNN-packed weights stay on the CPU."""
        device = resolve_device(device)
        if device == self.model.device:
            return self
        if self.streamed:
            if getattr(self.model, "packed", False) and device.type != "cpu":
                raise InputError("packed weights are oneDNN's CPU layout; load with packed=False to move to a CUDA device")
            self.model.device = device
            return self
        if self.model.packed:
            raise InputError("packed weights are oneDNN's CPU layout; load with packed=False to move the model off the CPU")
        with self.model._prefix_lock:
            self.model.to(device)
            self.model._prefix = None  # the cached prefix keys and values lie on the old device
        return self

    @staticmethod
    def list_prompts() -> list[tuple[str, str]]:
        return list_prompts()

    def dimension(self, kind: str, rw_layers: Sequence[int] | None = None) -> int:
        """Width of the vectors encode() returns for kind."""
        rw = len(self._rw_layer_positions(rw_layers)) * self.args.num_experts
        return get_kind(kind).width(self.args.hidden_size, rw)

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
        precision: str | None = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        **feature_options,
    ) -> np.ndarray:
        """Embed texts; returns float32 [len(texts), dim] in input order (one text as a str: its [dim] vector).

        texts: a list or tuple of str, a 1-D numpy array of str, or a single str (as sentence-transformers takes them).
        kind: the second positional argument (where sentence-transformers has prompt_name): hs, rw, moee-concat or
        moee-sum (the registry of kinds.py).
        prompt: a built-in name, a template holding {text}, or a prefix such as "query: " (prefix + {text}).
        alpha (moee-sum only): a number >= 0; "auto" for the label-free choice
        of section 3.3 over the unlabeled pairs `alpha_pairs` (or, without
        them, over pairs among `texts`); or an AlphaChoice from select_alpha().
        standardizer: fitted Standardizer(s) for the "hs" and/or "rw" component,
        applied before the components are combined.
        normalize / normalize_embeddings (sentence-transformers' spelling): scale each output vector to unit length.
        feature_options: the other fields of FeatureOptions (pooling, hs_layer, rw_values, rw_layers, allow_empty).
        max_length: the token budget per text; None: max_seq_length (the model's length unless set).
        As sentence-transformers has them (embedding/conventions.py): prompt_name (a key of `prompts`),
        truncate_dim (the first d dimensions, before normalizing; for hs and rw only: moee-concat and moee-sum are
        [HS; RW], and a cut would drop RW), precision ("float32" or None, "int8", "uint8", "binary", "ubinary"),
        convert_to_tensor (one torch tensor), convert_to_numpy=False (a list of row tensors).
        The authors' own computation is moee_ref.encode_official, not an option here.
        """
        single = isinstance(texts, str)
        if single:
            texts = [texts]
        elif isinstance(texts, np.ndarray) and texts.ndim == 1 and texts.dtype.kind in "UO":
            texts = texts.tolist()  # each item is still checked to be a str
        prompt = named_prompt(self.prompts, prompt_name, prompt, self.default_prompt_name)
        max_length = self._max_seq_length if max_length is None else max_length
        options = FeatureOptions.from_keywords(feature_options, self.encode, prompt=prompt, max_length=max_length, truncation=truncation)
        precision = check_precision(precision)  # before the work, not after
        if truncate_dim is not None:
            check_truncate_dim(truncate_dim, get_kind(kind), self.dimension(kind, options.rw_layers))
        choice = alpha if isinstance(alpha, AlphaChoice) else None
        spec = EmbedSpec(kind=kind, alpha=choice.alpha if choice else alpha,
                         standardizers=standardizer, normalize=(normalize or normalize_embeddings) and truncate_dim is None,
                         **vars(options))
        if self.config is not None:
            spec = spec.fill(self.config)
        result = pipeline.run(self, texts, spec, batch_size=batch_size, show_progress_bar=show_progress_bar,
                              alpha_pairs=alpha_pairs, alpha_choice=choice)
        self.last_report = result.report  # a convenience for the caller; nothing in moee-ref reads it back
        vectors = truncated(result.vectors, truncate_dim)
        if truncate_dim is not None and (normalize or normalize_embeddings):
            vectors = normalize_rows(vectors)  # the first truncate_dim dimensions, then unit length
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

    def vectors_from_features(self, feats: Features, kind: str, options: FeatureOptions, *, alpha=1.0, alpha_pairs=None,
                              batch_size: int | None = None, normalize: bool = False, standardizer=None) -> np.ndarray:
        """encode()'s vectors from the features() of all its texts: pipeline.finish with these settings."""
        spec = EmbedSpec(kind=kind, alpha=alpha, normalize=normalize, standardizers=standardizer, **vars(options)).check()
        result = pipeline.finish(self, feats, spec, alpha_pairs=alpha_pairs, batch_size=batch_size)
        self.last_report = result.report
        return result.vectors

    def get_sentence_embedding_dimension(self, kind: str = "moee-sum") -> int:
        """Width of encode()'s vectors for `kind` (sentence-transformers' name for dimension())."""
        return self.dimension(kind)

    @property
    def max_seq_length(self) -> int:
        """The token budget of encode() per text, prompt included: the model's max_position_embeddings unless set.
        Setting it (None: back to the model's) changes encode()'s default max_length; a longer text is still an
        error unless truncation= is given, as with max_length."""
        return self.args.max_position_embeddings if self._max_seq_length is None else self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int | None) -> None:
        limit = self.args.max_position_embeddings
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit):
            raise InputError(f"max_seq_length must be an integer in [1, {limit}] (the model's max_position_embeddings) "
                             f"or None, got {value!r}")
        self._max_seq_length = value

    @property
    def similarity_fn_name(self) -> str:
        """What similarity() and similarity_pairwise() compute, as sentence-transformers names it: "cosine" (the
        default), "dot", "euclidean" or "manhattan" (negative distances)."""
        return self._similarity_fn_name

    @similarity_fn_name.setter
    def similarity_fn_name(self, value) -> None:
        self._similarity_fn_name = check_similarity_fn_name(value)

    def similarity(self, a, b):
        """Score matrix [len(a), len(b)] of two sets of embeddings by similarity_fn_name (cosine of a zero vector: 0);
        float32, a torch tensor when either input is one, else numpy."""
        return similarity_matrix(a, b, self.similarity_fn_name)

    def similarity_pairwise(self, a, b):
        """similarity_fn_name of each row of a with the same row of b, [N]; a tensor when either input is one."""
        return similarity_rows(a, b, self.similarity_fn_name)

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
        row_names: the index an error names each text by (jobs/corpus.py chunks: its row in the whole corpus)."""
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
        batches that stretch when i and j are multiples of the batch size: jobs/corpus.py computes a corpus in such
        chunks with the very batches, so the very vectors, of one call."""
        options.check()
        texts = _check_texts(texts, options.allow_empty)
        if not texts:
            return [], 0
        _, sequences, too_long = self._sequences(texts, options)
        return _length_order(sequences), len(too_long)

    def token_ids(self, texts: Sequence[str], options: FeatureOptions | None = None) -> tuple[list[list[int]], list[int]]:
        """(the token ids every text runs as, prompt applied and cut to max_length; the indices of the texts cut),
        after the checks features() makes: what the decoder sees of each text (the route command, token counts)."""
        options = (options or FeatureOptions()).check()
        texts = _check_texts(texts, options.allow_empty)
        _, sequences, too_long = self._sequences(texts, options) if texts else (None, [], [])
        return sequences, too_long

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
            return [pool(out, mask, options.hs_layer, options.rw_values, options.pooling, rw_positions)
                    for out, (_, mask) in zip(outputs, batches)]

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


def similarity(a, b):
    """Cosine similarity matrix [len(a), len(b)] (a zero vector scores 0); a tensor when either input is one."""
    return similarity_matrix(a, b, "cosine")


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


def _check_texts(texts, allow_empty: bool) -> list[str]:
    check_texts(texts)
    for index, text in enumerate(texts):
        if not allow_empty and not text.strip():
            raise InputError(
                f"text at index {index} is empty or whitespace only; remove it, or pass allow_empty=True "
                "(--allow-empty on the command line) to embed the prompt around an empty text"
            )
    return list(texts)


def _length_order(sequences: list[list[int]]) -> list[int]:
    """Longest first: the first batch shows at once whether memory suffices, and similar lengths share a batch.
    Equal lengths stay in input order (a stable sort), so any run of this order sorts to itself again."""
    return sorted((i for i in range(len(sequences)) if sequences[i]), key=lambda i: -len(sequences[i]))
