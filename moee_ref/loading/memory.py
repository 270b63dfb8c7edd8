"""How much memory a way of loading a checkpoint takes, and how much this process may use.

A model that does not fit must be refused (or run another way) before any
weight is read: the kernel's out-of-memory killer gives no message and can
take the whole session with it. The sizes come from the safetensors headers
and the name map only, so checking costs no read of the weights.

What a process may use is the smallest of MemAvailable (/proc/meminfo) and
what its cgroup (v2 or v1, as containers and batch schedulers set) leaves it;
`memory_limit=` (CLI `--memory-limit`) replaces both, for a shared node or a test.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, MoEERefError
from ..families.names import leaves, shape_of
from ..kernels.int8 import QUANTIZE_ROWS
from ..kernels.precision import bf16_native

# What is neither weights nor read buffers: torch's own runtime, the tokenizer, one batch's activations
# (bench/bench_memory.py measures peak RSS against the weights; bench/README.md).
ALLOWANCE = 2**30
# The layer-streamed mode's own plan counts its activations and working memory when it sees the corpus
# (streamed.py `plan`); before that, this much is kept beside its weights.
STREAMED_ALLOWANCE = 2**29
# Matrices quantize_block_ leaves in full precision (kernels/int8.py): the router, norms, biases, the shared gate.
FULL_PRECISION = ("norm.weight", "router.weight", ".bias", "shared_gate.weight")


class InsufficientMemoryError(MoEERefError, MemoryError):
    """The chosen way of loading needs more memory than this process may use; the message names modes that fit."""


def parse_bytes(text: str | int, what: str = "memory budget") -> int:
    """'8GB', '512MiB', '2.5G', or a number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(text).lower())
        if not match:
            raise InputError(f"{what} {text!r} is not a size; write it like 8GB, 512MB or 2.5G")
        number, prefix, _ = match.groups()
        # GB and GiB alike mean 2**30: budgets are about memory, which comes in binary units.
        value = int(float(number) * (1024 ** ("kmgt".index(prefix) + 1) if prefix else 1))
    if value <= 0:
        raise InputError(f"{what} must be positive, got {text!r}")
    return value


def format_bytes(n: int, up: bool = True) -> str:
    """A need is rounded up (the smallest budget must work when passed back as printed); what is available,
    or a ceiling to stay under, is rounded down (up=False)."""
    rounding = math.ceil if up else math.floor
    if n >= 2**28:
        return f"{rounding(n / 2**30 * 100) / 100:.2f} GiB"
    return f"{rounding(n / 2**20 * 10) / 10:.1f} MiB"


# ---------------------------------------------------------------------- what the process may use


def memory_available(limit: str | int | None = None, device: torch.device | None = None) -> tuple[int, str]:
    """(bytes this process may still take, where that figure comes from). On a CUDA device, its free memory:
    the weights live there, and the host holds one layer at a time."""
    if limit is not None:
        return parse_bytes(limit, "memory limit"), "the memory limit given"
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free memory of {device}"
    found = []
    meminfo = _meminfo()
    if "MemAvailable" in meminfo:
        found.append((meminfo["MemAvailable"], "MemAvailable"))
    cgroup = _cgroup_room()
    if cgroup is not None:
        found.append((cgroup, "the cgroup memory limit"))
    if not found:  # not Linux: nothing to go by, so nothing is refused
        return 2**62, "no memory figure on this system"
    return min(found)


def _meminfo() -> dict[str, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _cgroup_room(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes left under the tightest cgroup limit above this process (reclaimable page cache counted as free)."""
    try:
        entries = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for entry in entries:
        _, controllers, path = entry.split(":", 2)
        if controllers == "":  # v2: every level of the hierarchy can set memory.max
            directory = root / path.lstrip("/")
            while True:
                room = _room(directory / "memory.max", directory / "memory.current", directory / "memory.stat", "inactive_file")
                if room is not None:
                    rooms.append(room)
                if directory == root or root not in directory.parents:
                    break
                directory = directory.parent
        elif "memory" in controllers.split(","):  # v1
            directory = root / "memory" / path.lstrip("/")
            for d in (directory, root / "memory"):
                room = _room(d / "memory.limit_in_bytes", d / "memory.usage_in_bytes", d / "memory.stat", "total_inactive_file")
                if room is not None:
                    rooms.append(room)
                    break
    return min(rooms) if rooms else None


def _room(limit_file: Path, usage_file: Path, stat_file: Path, inactive_key: str) -> int | None:
    try:
        limit = limit_file.read_text().strip()
        usage = int(usage_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:  # v1 writes "no limit" as a huge number
        return None
    inactive = 0
    try:
        for line in stat_file.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    except (OSError, ValueError):
        pass
    return max(0, int(limit) - max(0, usage - inactive))


# ---------------------------------------------------------------------- what a mode takes


def _count(leaf) -> int:
    return int(np.prod(leaf.shape))


def quantized(name: str) -> bool:
    return not name.endswith(FULL_PRECISION)


def held_bytes(group, dtype: torch.dtype, int8: bool) -> int:
    """Bytes one name map group takes as held for compute: in dtype, or int8 matrices with float32 row scales."""
    element = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for name, recipe in group.items():
        shape = shape_of(recipe)  # as built: MXFP4's bytes hold two values each, plus a scale per 32
        values = int(np.prod(shape))
        if int8 and quantized(name):
            total += values + 4 * values // shape[-1]
        else:
            total += values * element
    return total


def resident_need(groups, reader, dtype: torch.dtype, int8: bool, packed: bool) -> int:
    """Peak bytes of a resident load (checkpoint.py `load_model`) and a run at the usual batch sizes.

    The weights as held, plus the transients of loading: the read-ahead's stored
    tensors, and with int8 one layer built in full precision and the float32
    working copies of quantize_rows (kernels/int8.py).
    """
    element = torch.empty(0, dtype=dtype).element_size()
    last = len(groups) - 1
    total = 0
    for index, group in enumerate(groups):
        layer = 0 < index < last
        for name, recipe in group.items():
            if packed and name == "embed.weight":  # kept as stored where that is bf16/fp16 (fill_module)
                leaf = next(leaves(recipe))
                total += _count(leaf) * min(element, reader.element_size(leaf.name))
            else:
                total += held_bytes({name: recipe}, dtype, int8 and layer)
    stored = [_count(leaf) * reader.element_size(leaf.name) for group in groups for r in group.values() for leaf in leaves(r)]
    transient = 3 * max(stored)  # read ahead two stored tensors, convert the one in hand
    if int8 and last > 1:
        largest_layer = max(range(1, last), key=lambda i: held_bytes(groups[i], dtype, False))
        widest = max(leaf.shape[-1] for r in groups[largest_layer].values() for leaf in leaves(r))
        transient += held_bytes(groups[largest_layer], dtype, False) + 2 * 4 * QUANTIZE_ROWS * widest
    return total + transient + ALLOWANCE


def streamed_weights_need(layer_groups, reader, dtype: torch.dtype, int8: bool, prefetch: bool = True) -> int:
    """Bytes the layer-streamed mode's weights take at the worst moment: one layer resident while the next is built.

    Parameters are filled in place leaf by leaf (checkpoint.py `build`), so building
    costs the layer itself plus one stored leaf; int8 first builds the
    layer in full precision, then quantizes it.
    """
    element = torch.empty(0, dtype=dtype).element_size()
    held = [held_bytes(group, dtype, int8) for group in layer_groups]
    largest = max(range(len(layer_groups)), key=held.__getitem__)
    group = layer_groups[largest]
    building = held_bytes(group, dtype, False) if int8 else held[largest]
    building += max(_count(leaf) * (reader.element_size(leaf.name) + element) for r in group.values() for leaf in leaves(r))
    return (held[largest] if prefetch else 0) + building


@dataclass(frozen=True)
class Mode:
    """One way of loading a checkpoint, with the bytes it needs."""

    dtype: torch.dtype
    int8: bool = False
    memory_budget: int | None = None
    need: int = 0
    caveat: str = ""  # said after its size where the mode fits but runs slowly here

    def sized(self) -> str:
        """describe() with the bytes it needs (a streamed mode's budget says them already), and any caveat."""
        size = "" if self.memory_budget is not None else f"about {format_bytes(self.need)}"
        said = "; ".join(part for part in (size, self.caveat) if part)
        return f"{self.describe()} ({said})" if said else self.describe()

    def describe(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        if self.memory_budget is not None:
            what = f"layer-streamed {'int8' if self.int8 else name} within {format_bytes(self.memory_budget)}"
        else:
            what = f"resident int8 ({name} compute)" if self.int8 else f"resident {name}"
        return what

    def api(self) -> str:
        return ", ".join(keyword for keyword, _ in self._spellings())

    def cli(self) -> str:
        return " ".join(flag for _, flag in self._spellings())

    def _spellings(self) -> list[tuple[str, str]]:
        """(API keyword, command-line flag) for each option this mode sets."""
        name = str(self.dtype).removeprefix("torch.")
        options = [(f"dtype=torch.{name}", f"--dtype {name}")]
        if self.int8:
            options.append(("int8=True", "--int8"))
        if self.memory_budget is not None:
            budget = _budget_text(self.memory_budget)
            options.append((f"memory_budget={budget!r}", f"--memory-budget {budget}"))
        return options


def _budget_text(n: int) -> str:
    return f"{n / 2**30:.1f}GB".replace(".0GB", "GB") if n >= 2**30 else f"{math.ceil(n / 2**20)}MB"


def streamed_budget(minimum: int, available: int, step: int = 2**28) -> int | None:
    """A layer-streamed budget that fits `available` (most of it: more budget, less spilling), or None.
    A tenth is kept free; the budget is a whole number of steps (a quarter GiB reads well)."""
    budget = int(available * 0.9) // step * step
    return budget if budget >= minimum else None


def modes_that_fit(groups, reader, dtype: torch.dtype, available: int, device: torch.device | str = "cpu") -> list[Mode]:
    """The other ways to load this checkpoint that fit `available`, in the order a user would try them:
    resident bf16, resident int8, layer-streamed (in dtype, then int8). Where the device computes bf16
    slowly (emulated), resident bf16 comes after int8 and says so."""
    compute = torch.float32 if dtype == torch.float64 else dtype  # int8 has no float64 mode
    tried = [Mode(compute, int8=True, need=resident_need(groups, reader, compute, True, False))]
    if dtype not in (torch.bfloat16, torch.float16):
        native, why = bf16_native(device)
        bf16 = Mode(torch.bfloat16, need=resident_need(groups, reader, torch.bfloat16, False, False),
                    caveat="" if native else f"slow here: {why}")
        tried.insert(0 if native else 1, bf16)
    fitting = [mode for mode in tried if mode.need <= available]
    for int8, streamed_dtype in ((False, dtype), (True, compute)):
        minimum = streamed_weights_need(groups[1:-1], reader, streamed_dtype, int8) + STREAMED_ALLOWANCE
        budget = streamed_budget(minimum, available)
        if budget is not None:
            fitting.append(Mode(streamed_dtype, int8, budget, need=budget))
            break
    return fitting


def refusal(label: str, mode: Mode, available: int, source: str, fitting: list[Mode]) -> InsufficientMemoryError:
    """The error for a mode that does not fit, naming the ones that do."""
    message = (
        f"loading {label} {mode.describe()} needs about {format_bytes(mode.need)}, more than the "
        f"{format_bytes(available, up=False)} this process may use ({source}); nothing was read. "
    )
    if fitting:
        options = "; ".join(f"{m.sized()}: {m.api()} or {m.cli()}" for m in fitting)
        message += f"Modes that fit: {options}."
    else:
        message += "No mode fits, not even layer-streamed int8: free memory or use a machine with more."
    message += " If the memory will be there (other processes about to end), pass memory_limit= or --memory-limit."
    return InsufficientMemoryError(message)
