"""MoEE: a sentence-transformers input module whose forward gives `sentence_embedding` from moee-ref's decoder.

A thin front end: the module holds an MoEEmbedder and one EmbedSpec (embedding/spec.py), and each batch that
sentence-transformers hands to forward() goes through the pipeline (embedding/pipeline.py) as
MoEEmbedder.encode sends it. A vector of the default mode depends only on its text and the settings, so
sentence-transformers' own batching changes nothing: its vectors equal MoEEmbedder.encode's.

What sentence-transformers decides around the module:
- prompts: the prompt it resolves (prompt=, prompt_name=, encode_query/encode_document, default_prompt_name)
  replaces the module's own prompt for that call, read as MoEEmbedder reads one: a prefix ("query: "), a
  template holding {text}, or a built-in name; an empty prompt leaves the module's.
- truncate_dim: sentence-transformers keeps the first d columns after forward(), for any model; for
  moee-concat and moee-sum that drops RW ([HS; RW]), which MoEEmbedder.encode refuses. Leave it unset there.
- similarity_fn_name, precision, normalize_embeddings: its own, on the vectors returned.

save() writes the settings (CONFIG_FILE, JSON), each standardizer (.npz of plain arrays) and a pointer to the
checkpoint (its absolute folder, or its hub id), or with copy_checkpoint=True a copy of its files; never a
pickle. The checkpoint's identity (loading/identity.py) is saved too, and a load that finds another checkpoint
there is refused. sentence-transformers 6 imports a module class outside its own namespace only with
trust_remote_code=True (for local folders too), so a saved model loads with `load(path)` here (which reads
only this module's files) or with SentenceTransformer(path, trust_remote_code=True), which imports the
installed moee_ref.st and runs no code from the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from sentence_transformers.base.modules import InputModule

from ..embedding import pipeline
from ..embedding.alpha import AlphaChoice
from ..embedding.conventions import as_template
from ..embedding.embedder import MoEEmbedder
from ..embedding.spec import FEATURE_FIELDS, EmbedSpec, FeatureOptions, refuse_unknown
from ..embedding.standardize import Standardizer
from ..errors import CheckpointError, InputError
from ..loading.identity import checkpoint_identity

CONFIG_FILE = "moee_config.json"
FORMAT_VERSION = 1
COPY_FOLDER = "checkpoint"  # copy_checkpoint=True: the checkpoint's files, inside the saved folder
LOAD_OVERRIDES = ("dtype", "int8", "device", "memory_limit", "packed")  # model_kwargs a saved model may be loaded with


class MoEE(InputModule):
    """MoEE vectors of one kind and one set of settings, as a sentence-transformers module.

    model: a checkpoint (folder or hub id), loaded with MoEEmbedder.from_pretrained(model, dtype=, int8=, device=),
    or an MoEEmbedder already loaded (resident: the layer-streamed mode reads every layer once per call, and
    sentence-transformers calls forward once per batch).
    kind, prompt, alpha, standardizer, normalize and the feature options (pooling, hs_layer, rw_values,
    rw_layers, max_length, truncation, allow_empty): as MoEEmbedder.encode takes them. alpha is a number or an
    AlphaChoice (select_alpha), not "auto": sentence-transformers encodes in batches of its own, and "auto" is
    chosen over the texts encoded together.
    batch_size: the decoder's batch size inside each of sentence-transformers' batches (default: the
    embedder's); it changes no vector.
    copy_checkpoint: save() copies the checkpoint's files into the saved folder instead of pointing at them.
    """

    config_file_name = CONFIG_FILE
    save_in_root = True

    def __init__(self, model, kind: str = "moee-sum", *, prompt: str | None = None, alpha: float | AlphaChoice = 1.0,
                 standardizer=None, normalize: bool = False, dtype: str | torch.dtype = "auto", int8: bool = False,
                 device: str | torch.device | None = None, batch_size: int | None = None, copy_checkpoint: bool = False,
                 **feature_options):
        super().__init__()
        if isinstance(model, MoEEmbedder):
            if dtype != "auto" or int8 or device is not None:
                raise InputError("dtype, int8 and device are how a checkpoint is loaded: an MoEEmbedder given as model "
                                 "is used as it was loaded (move it with .to(device))")
            embedder, checkpoint = model, str(Path(model.model.source_dir).resolve())
        elif isinstance(model, (str, os.PathLike)):
            embedder = MoEEmbedder.from_pretrained(model, dtype=dtype, int8=int8, device="auto" if device is None else device)
            checkpoint = str(Path(model).resolve()) if Path(model).expanduser().is_dir() else str(model)
        else:
            raise InputError(f"model must be a checkpoint (a folder or a hub id) or an MoEEmbedder, got {type(model).__name__}")
        if embedder.streamed:
            raise InputError("the layer-streamed mode (memory_budget) reads every layer once per call, and sentence-transformers "
                             "calls once per batch; embed corpora with MoEEmbedder.encode or `moee embed` instead")
        if isinstance(alpha, AlphaChoice):
            alpha = alpha.alpha
        if isinstance(alpha, str):
            raise InputError(f"alpha={alpha!r}: sentence-transformers encodes in batches of its own, and 'auto' is chosen "
                             "over the texts encoded together; choose alpha beforehand (MoEEmbedder.select_alpha)")
        options = FeatureOptions.from_keywords(feature_options, type(self), prompt=as_template(prompt))
        self.embedder = embedder
        self.spec = EmbedSpec(kind=kind, alpha=alpha, normalize=bool(normalize), standardizers=standardizer,
                              **vars(options)).check()
        self.batch_size = batch_size
        self.copy_checkpoint = bool(copy_checkpoint)
        self.checkpoint = checkpoint
        self.checkpoint_revision = checkpoint_identity(embedder.model.source_dir)[1]
        self.tokenizer = embedder.tokenizer
        # Where the module computes, for sentence-transformers' .device and .to() (see _apply); no weight of its own.
        self.register_buffer("device_marker", torch.empty(0, device=embedder.device), persistent=False)

    # ------------------------------------------------------------ the module

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, Any]:
        """{"texts", "prompt"}: the texts as they are (the prompt is applied by the pipeline, around the text).
        task ("query", "document": encode_query/encode_document's routing for Router modules) changes nothing here."""
        given = sorted(k for k, v in kwargs.items() if v is not None and k != "task")
        if given:
            raise InputError(f"MoEE takes no {', '.join(given)} (its settings are the module's: MoEE(...))")
        texts = list(inputs)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"MoEE embeds text only; the input at index {index} is {type(text).__name__}")
        return {"texts": texts, "prompt": prompt or None}

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        spec = self.spec if features.get("prompt") is None else self.spec.replace(prompt=as_template(features["prompt"]))
        result = pipeline.run(self.embedder, features["texts"], spec, batch_size=self.batch_size, show_progress_bar=False)
        features["sentence_embedding"] = torch.from_numpy(result.vectors).to(self.device_marker.device)
        return features

    def get_embedding_dimension(self) -> int:
        return self.embedder.dimension(self.spec.kind, self.spec.rw_layers)

    @property
    def max_seq_length(self) -> int:
        """The token budget per text (sentence-transformers' model.max_seq_length): max_length, else the model's."""
        return self.spec.max_length or self.embedder.args.max_position_embeddings

    @max_seq_length.setter
    def max_seq_length(self, value: int | None) -> None:
        limit = self.embedder.args.max_position_embeddings
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit):
            raise InputError(f"max_seq_length must be an integer in [1, {limit}] (the model's max_position_embeddings) "
                             f"or None, got {value!r}")
        self.spec = self.spec.replace(max_length=value)

    def _apply(self, fn, recurse: bool = True):
        """.to(device), .cpu(), .cuda() move the embedder's model; a change of dtype (.half()) is refused: the
        compute dtype is chosen when the checkpoint is loaded (dtype=)."""
        if fn(torch.zeros(0)).dtype != torch.float32:
            raise InputError("MoEE computes in the dtype its checkpoint was loaded with; choose it there "
                             "(MoEE(model, dtype=...)), not by casting the module")
        super()._apply(fn, recurse)
        self.embedder.to(self.device_marker.device)
        return self

    def __reduce__(self):
        """Pickled (start_multi_process_pool sends the model to its workers) as its settings: a worker loads the
        checkpoint again from its pointer, with the same dtype and int8."""
        return (_rebuild, (self.get_config_dict(), self.spec.standardizers))

    # ------------------------------------------------------------ saving

    def get_config_dict(self) -> dict[str, Any]:
        spec = self.spec
        model = self.embedder.model
        features = {name: getattr(spec, name) for name in FEATURE_FIELDS if name != "prompt"}
        features["rw_layers"] = None if spec.rw_layers is None else list(spec.rw_layers)
        return {
            "format_version": FORMAT_VERSION,
            "checkpoint": self.checkpoint,
            "checkpoint_revision": self.checkpoint_revision,
            "kind": spec.kind,
            "prompt": spec.prompt,
            "alpha": float(spec.alpha),
            "normalize": spec.normalize,
            **features,
            "dtype": str(model.dtype).removeprefix("torch."),
            "int8": bool(model.int8),
            # How the decoder batches and multiplies: no vector depends on them beyond float32 rounding, and with
            # them a saved model gives its vectors bit for bit.
            "batch_size": self.batch_size or self.embedder.batch_size,
            "share_prefix": self.embedder.share_prefix,
            "packed": bool(getattr(model, "packed", False)),
            "standardizers": [f"standardizer_{item.kind}.npz" for item in spec.standardizers],
        }

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        output = Path(output_path)
        config = self.get_config_dict()
        if self.copy_checkpoint:
            target = output / COPY_FOLDER
            target.mkdir(parents=True, exist_ok=True)
            for file in sorted(Path(self.embedder.model.source_dir).iterdir()):
                if file.is_file():
                    shutil.copyfile(file, target / file.name)  # a hub snapshot's links: the files they point at
            config["checkpoint"] = None
            config["checkpoint_copied"] = COPY_FOLDER
        for item, name in zip(self.spec.standardizers, config["standardizers"]):
            item.save(output / name)
        with open(output / CONFIG_FILE, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
             local_files_only: bool = False, model_kwargs: dict | None = None, **kwargs) -> "MoEE":
        """The module of a saved model (sentence-transformers calls this); model_kwargs may override how the
        checkpoint is loaded: dtype, int8, device, memory_limit, packed."""
        hub = dict(subfolder=subfolder, token=token, cache_folder=cache_folder, revision=revision, local_files_only=local_files_only)
        config = cls.load_config(model_name_or_path, **hub)
        if not config:
            raise CheckpointError(f"{model_name_or_path}: no {CONFIG_FILE}; it is not a saved MoEE model")
        directory = cls.load_dir_path(model_name_or_path, **hub)
        return from_config(config, directory, **(model_kwargs or {}))


def from_config(config: dict[str, Any], directory, **overrides) -> MoEE:
    """The module a saved config describes; `directory` holds its standardizers (and a copied checkpoint)."""
    refuse_unknown("load", [key for key in overrides if key not in LOAD_OVERRIDES], list(LOAD_OVERRIDES))
    config = dict(config)
    if config.pop("format_version", None) != FORMAT_VERSION:
        raise CheckpointError(f"{CONFIG_FILE} is not of format {FORMAT_VERSION}; save the model again with this moee-ref")
    directory = Path(directory)
    copied = config.pop("checkpoint_copied", None)
    source = (directory / copied).resolve() if copied else config["checkpoint"]
    config.pop("checkpoint")
    saved_revision = config.pop("checkpoint_revision")
    standardizers = [Standardizer.load(directory / name) for name in config.pop("standardizers")]
    batch_size = config.pop("batch_size")
    packed = None if config.pop("packed") else False  # packed where it applies, as from_pretrained chose it at first
    load = {"dtype": config.pop("dtype"), "int8": config.pop("int8"), "share_prefix": config.pop("share_prefix"),
            "packed": packed, **overrides}
    embedder = MoEEmbedder.from_pretrained(source, **load)
    revision = checkpoint_identity(embedder.model.source_dir)[1]
    if revision != saved_revision:
        message = (f"the checkpoint at {source} is not the one this model was saved with (identity {revision}, saved "
                   f"{saved_revision}): its vectors would differ")
        if Path(str(source)).expanduser().is_dir():
            raise CheckpointError(message + "; point the saved model at that checkpoint again, or save with copy_checkpoint=True")
        warnings.warn(message + " (the hub repository has moved on)", stacklevel=2)
    module = MoEE(embedder, config.pop("kind"), prompt=config.pop("prompt"), alpha=config.pop("alpha"),
                  normalize=config.pop("normalize"), standardizer=standardizers or None,
                  batch_size=batch_size, **config)
    if not copied:
        module.checkpoint = str(source)  # the pointer as saved (a hub id stays a hub id)
    return module


def _rebuild(config: dict[str, Any], standardizers) -> MoEE:
    config = dict(config, standardizers=[])
    module = from_config(config, ".")
    if standardizers:
        module.spec = module.spec.replace(standardizers=standardizers)
    return module


def load(path: str | os.PathLike, **kwargs):
    """A SentenceTransformer saved with an MoEE module, without trust_remote_code: this reads modules.json (the
    MoEE module first, sentence-transformers' own modules after it), the module's settings and
    config_sentence_transformers.json (prompts, default_prompt_name, similarity_fn_name), and imports nothing
    the folder names outside moee_ref.st and sentence_transformers. kwargs: SentenceTransformer's (device,
    prompts, truncate_dim, ...) and model_kwargs (dtype, int8, device, memory_limit, packed)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import import_from_string

    path = Path(path)
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        raise CheckpointError(f"{path}: no modules.json; it is not a saved sentence-transformers model")
    entries = json.loads(modules_file.read_text(encoding="utf-8"))
    if not entries or entries[0].get("type") != f"{MoEE.__module__}.MoEE":
        raise CheckpointError(f"{path}: its first module is {entries[0].get('type') if entries else None!r}, not "
                              f"{MoEE.__module__}.MoEE; load it with SentenceTransformer()")
    model_kwargs = kwargs.pop("model_kwargs", None) or {}
    modules = [MoEE.load(str(path), subfolder=entries[0]["path"], model_kwargs=model_kwargs)]
    for entry in entries[1:]:
        if not entry["type"].startswith("sentence_transformers."):
            raise CheckpointError(f"{path}: module {entry['type']!r} is not sentence-transformers' own; "
                                  "load it with SentenceTransformer(..., trust_remote_code=True) if you trust it")
        modules.append(import_from_string(entry["type"]).load(str(path), subfolder=entry["path"]))
    settings_file = path / "config_sentence_transformers.json"
    settings = json.loads(settings_file.read_text(encoding="utf-8")) if settings_file.is_file() else {}
    for key in ("prompts", "default_prompt_name", "similarity_fn_name"):
        if settings.get(key) is not None:
            kwargs.setdefault(key, settings[key])
    return SentenceTransformer(modules=modules, **kwargs)


__all__ = ["MoEE", "load", "from_config"]
