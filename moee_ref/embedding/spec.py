"""EmbedSpec: every setting that changes a vector, in one frozen object.

Every front end (encode, the command line, the STS and MTEB evaluations, corpus jobs, the server) builds
one EmbedSpec and hands it to the pipeline (pipeline.py); `check()` validates it once, and `identity()` is
what a resumable job or a cache compares. What does not change a vector (batch size, progress bars) stays
out of it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import InputError, UnknownOptionError
from ..loading.identity import standardizer_digest
from .kinds import KINDS, get_kind
from .prompts import resolve_prompt
from .standardize import Standardizer

POOLINGS = ("last", "mean")
HS_LAYERS = ("last", "mean")
RW_VALUES = ("probs", "logits")
TRUNCATION = (None, "left", "right")
MODES = ("default", "official")
ENSEMBLES = ("standardized", "unstandardized")  # the official mode's moee-sum of standardised or raw HS and RW


@dataclass(frozen=True)
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

    def check(self) -> "FeatureOptions":
        for name, value, valid in (
            ("pooling", self.pooling, POOLINGS),
            ("hs_layer", self.hs_layer, HS_LAYERS),
            ("rw_values", self.rw_values, RW_VALUES),
            ("truncation", self.truncation, TRUNCATION),
        ):
            if value not in valid:
                raise InputError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")
        return self


FEATURE_FIELDS = tuple(f.name for f in dataclasses.fields(FeatureOptions))


@dataclass(frozen=True)
class EmbedSpec:
    """How to embed: the kind, the feature options, alpha, standardisation, normalisation and the mode.

    alpha: a number >= 0, or "auto" (chosen over the texts embedded together, or over alpha pairs: see
    pipeline.py); only kinds that use it (moee-sum) take one other than the default.
    mode "official": the authors' public code (official.py), with its instruction and ensemble."""

    kind: str = "moee-sum"
    prompt: str | None = None
    alpha: float | str = 1.0
    pooling: str = "last"
    hs_layer: str = "last"
    rw_values: str = "probs"
    rw_layers: tuple[int, ...] | None = None
    max_length: int | None = None
    truncation: str | None = None
    allow_empty: bool = False
    normalize: bool = False
    standardizers: tuple[Standardizer, ...] = field(default=(), compare=False)  # compared through identity()
    mode: str = "default"
    instruction: str | None = None
    ensemble: str = "standardized"

    def __post_init__(self):
        # Lists given by callers become tuples, so that a spec stays frozen all the way down.
        if self.rw_layers is not None and not isinstance(self.rw_layers, (str, bytes, tuple)):
            object.__setattr__(self, "rw_layers", tuple(self.rw_layers))
        standardizers = self.standardizers
        if standardizers is None:
            standardizers = ()
        elif isinstance(standardizers, Standardizer):
            standardizers = (standardizers,)
        object.__setattr__(self, "standardizers", tuple(standardizers))

    @property
    def features(self) -> FeatureOptions:
        return FeatureOptions(**{name: getattr(self, name) for name in FEATURE_FIELDS})

    @property
    def official(self) -> bool:
        return self.mode == "official"

    def replace(self, **changes) -> "EmbedSpec":
        return dataclasses.replace(self, **changes)

    def to_json(self, **options) -> dict:
        """The spec written out (spec_to_json): what a saved configuration and an output's provenance hold."""
        return spec_to_json(self, **options)

    @classmethod
    def from_json(cls, values: dict) -> "EmbedSpec":
        return spec_from_json(values)

    def fill(self, defaults: "EmbedSpec") -> "EmbedSpec":
        """This spec with every field still at its default taken from `defaults` (a saved configuration)."""
        changes = {}
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default if f.default is not dataclasses.MISSING else ()
            if value == default or (f.name == "standardizers" and not value):
                changes[f.name] = getattr(defaults, f.name)
        return dataclasses.replace(self, **changes)

    def check(self) -> "EmbedSpec":
        """Every setting checked, before any text is read or any weight computed; returns self."""
        kind = get_kind(self.kind)
        if self.mode not in MODES:
            raise InputError(f"mode={self.mode!r} is not valid; choose one of {', '.join(MODES)}")
        if self.ensemble not in ENSEMBLES:
            raise InputError(f"ensemble={self.ensemble!r} is not valid; choose one of {', '.join(ENSEMBLES)}")
        if not self.official and (self.instruction is not None or self.ensemble != "standardized"):
            raise InputError("instruction and ensemble are settings of the official mode (mode='official')")
        if self.official and kind.official is None:
            raise InputError(f"kind {self.kind!r} is not in the authors' code; the official mode computes "
                             f"{', '.join(name for name, k in KINDS.items() if k.official is not None)}")
        check_alpha(self.alpha, allow_auto=not self.official)  # a kind that does not use alpha ignores it
        self.features.check()
        check_standardizers(self.standardizers)
        if not self.official:
            resolve_prompt(self.prompt)  # an unknown prompt name, before any work
        return self

    def identity(self) -> dict:
        """What identifies these settings' vectors (JSON-able): every setting, standardizers by digest."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "standardizers"}
        values["rw_layers"] = None if self.rw_layers is None else list(self.rw_layers)
        values["standardizers"] = standardizer_digest(self.standardizers) if self.standardizers else None
        return values


CONFIG_FORMAT, CONFIG_VERSION = "moee-ref embedding config", 1


def spec_to_json(spec: EmbedSpec, *, alpha: float | None = None, standardizers: str = "inline") -> dict:
    """The spec as JSON: every field, alpha as a number (`alpha`: the one used, where it was "auto"; None for a kind
    that does not use it), standardizers inline (mean, std: a config reproduces vectors bit for bit) or by digest."""
    values = spec.identity()
    if get_kind(spec.kind).uses_alpha:
        value = spec.alpha if alpha is None else alpha
        if value == "auto":
            raise InputError("alpha 'auto' is not chosen yet: write the spec out with the alpha the run used")
        values["alpha"] = float(value)
    else:
        values["alpha"] = None  # this kind does not use alpha: none was used
    if standardizers == "inline":
        values["standardizers"] = [{"kind": s.kind, "eps": s.eps, "mean": s.mean.tolist(), "std": s.std.tolist()}
                                   for s in spec.standardizers]
    return values


def spec_from_json(values: dict, *, source: str = "the configuration") -> EmbedSpec:
    """The EmbedSpec spec_to_json wrote (standardizers inline), checked; unknown or missing settings refused."""
    if not isinstance(values, dict):
        raise InputError(f"{source}: expected a JSON object of embedding settings, got {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(EmbedSpec)]
    unknown = [k for k in values if k not in known]
    if unknown:
        raise InputError(f"{source}: unknown setting(s) {', '.join(unknown)}; it holds {', '.join(known)}")
    values = dict(values)
    if values.get("alpha", 1.0) is None:
        values["alpha"] = 1.0  # a kind that does not use alpha: the default, which changes nothing
    if values.get("alpha") == "auto":
        raise InputError(f"{source}: alpha is 'auto'; a saved configuration holds the alpha chosen, as a number")
    items = values.pop("standardizers", None) or []
    if isinstance(items, str):
        raise InputError(f"{source}: its standardizers are named by digest ({items}) only; a configuration "
                         "holds them whole (moee embed --save-config writes one)")
    try:
        standardizers = tuple(Standardizer(mean=np.asarray(i["mean"], np.float64), std=np.asarray(i["std"], np.float64),
                                           kind=i["kind"], eps=i["eps"]) for i in items)
    except (KeyError, TypeError) as exc:
        raise InputError(f"{source}: a standardizer needs kind, eps, mean and std ({exc})") from None
    if values.get("rw_layers") is not None:
        values["rw_layers"] = tuple(values["rw_layers"])
    return EmbedSpec(**values, standardizers=standardizers).check()


def save_config(spec: EmbedSpec, path, *, alpha: float | None = None) -> dict:
    """Write the embedding configuration (the spec with alpha as a number) that load_config reads back."""
    import json

    from .. import __version__
    from ..io.outputs import atomic_path

    record = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "moee_ref": __version__,
              "spec": spec_to_json(spec, alpha=alpha)}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def load_config(config) -> EmbedSpec:
    """An EmbedSpec from a configuration: a path to what save_config wrote, its dict, or an EmbedSpec."""
    import json
    from pathlib import Path

    if isinstance(config, EmbedSpec):
        return config.check()
    source = "the configuration"
    if not isinstance(config, dict):
        source = str(config)
        try:
            config = json.loads(Path(config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{source}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{source}: not a readable JSON file ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise InputError(f"{source}: not an embedding configuration (moee embed --save-config writes one)")
    if config.get("version") != CONFIG_VERSION:
        raise InputError(f"{source}: configuration version {config.get('version')!r}; this moee-ref reads version {CONFIG_VERSION}")
    return spec_from_json(config.get("spec"), source=source)


def check_alpha(alpha, *, allow_auto: bool = True) -> float | str:
    """alpha as the pipeline takes it: a finite number >= 0, or (allow_auto) "auto"."""
    if allow_auto and alpha == "auto":
        return alpha
    if allow_auto and isinstance(alpha, str):
        raise InputError(f"alpha={alpha!r} is not valid; give a number >= 0, 'auto' or an AlphaChoice")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        auto = ", 'auto' or an AlphaChoice" if allow_auto else " (the official mode takes a fixed alpha, as the authors' code does)"
        raise InputError(f"alpha must be a finite number >= 0{auto}; got {alpha!r}")
    return float(alpha)


def check_standardizers(standardizers) -> None:
    """One fitted Standardizer per component at most, of kind "hs" or "rw"."""
    seen = set()
    for item in standardizers:
        if not isinstance(item, Standardizer):
            raise InputError(f"standardizer must be a Standardizer (or a list of them), got {type(item).__name__}")
        if item.kind not in ("hs", "rw") or item.kind in seen:
            raise InputError(
                f"standardizer kind {item.kind!r}: expected one standardizer per component, of kind 'hs' or 'rw' "
                "(fit them with MoEEmbedder.fit_standardizer)"
            )
        seen.add(item.kind)


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
