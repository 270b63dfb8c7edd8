"""The supported model families, by config.json model_type.

Each family module holds only what differs: how to read its config.json
into ModelArgs, and the checkpoint names of its own parts (q/k norms,
biases, shared experts and their gate, dense layers).
"""

from . import deepseek, olmoe, qwen2_moe

FAMILIES = {module.MODEL_TYPE: module for module in (olmoe, qwen2_moe, deepseek)}
