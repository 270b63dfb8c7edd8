"""The supported model families, by config.json model_type, and reading a config into ModelArgs.

Each family is one file that holds everything about it:
  MODEL_TYPE        the config.json model_type it serves
  args_from_config  config.json (through ConfigReader) -> ModelArgs
  layer_names       the checkpoint names of one decoder layer (names.py has the shared pieces)
  OFFICIAL_RW       which router output the authors' code uses as RW ("logits" or "probs"; None: a family
                    their code does not cover, so no official mode)
  DEMO_CONFIG       a small config with every feature of the family on, for demo checkpoints
  TOKENIZER_STYLE   the special-token conventions of its tokenizer, for demo tokenizers
and optionally outer_names(args) (embedding, final norm and head, when not the
LLaMA names) and transformers_reference(transformers, args, read) (when
transformers' AutoModel cannot load the checkpoint as it is).
A new family is one file here and one entry in FAMILIES.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..decoder.args import ModelArgs
from ..errors import ConfigError
from . import deepseek, deepseek_v2, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from .config import ConfigReader
from .names import NameMap, outer

FAMILIES = {module.MODEL_TYPE: module for module in (olmoe, qwen2_moe, deepseek, qwen3_moe, mixtral, deepseek_v2, gpt_oss)}


def family_of(args: ModelArgs):
    return FAMILIES[args.family]


def name_map_groups(args: ModelArgs) -> list[NameMap]:
    """The name map in loading order: embeddings, each decoder layer, then final norm and head."""
    family = family_of(args)
    before, after = getattr(family, "outer_names", outer)(args)
    return [before, *(family.layer_names(args, layer) for layer in range(args.num_layers)), after]


def with_checkpoint_layout(args: ModelArgs, stored_names) -> ModelArgs:
    """args for the expert layout the shards actually hold: fused [E, ...] tensors (transformers 5's in-memory
    names, as some tools save them), MXFP4 blocks and scales, or the released one tensor per expert."""
    stored_names = list(stored_names)
    fused = any(name.endswith(".experts.gate_up_proj") for name in stored_names)
    mxfp4 = any(name.endswith(".experts.gate_up_proj_blocks") for name in stored_names)  # gpt-oss as released
    return replace(args, fused_experts=fused, mxfp4_experts=mxfp4)


def parse_config(raw: dict[str, Any], origin: str = "config.json") -> ModelArgs:
    """ModelArgs from a config dict, dispatching on its model_type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError(f"{origin}: field 'model_type' is missing; supported: {', '.join(FAMILIES)}")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ConfigError(
            f"{origin}: model_type {model_type!r} is not supported; supported model types: {', '.join(FAMILIES)}"
        )
    return family.args_from_config(ConfigReader(raw, origin))


def read_config(path: str | Path) -> ModelArgs:
    """ModelArgs from a config.json file (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json found; a checkpoint directory needs one")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); re-download the checkpoint's config.json") from exc
    return parse_config(raw, str(path))
