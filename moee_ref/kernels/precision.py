"""Which compute dtype to run in: `dtype="auto"` decided from what this machine does fast.

bf16 halves the bytes every matmul reads and, on a CPU with bf16 dot
products (avx512_bf16, AMX) or a CUDA device, runs its matmuls about twice
as fast as float32. Where the CPU lacks them, oneDNN emulates bf16 and a
matmul can be many times slower. So "auto" asks oneDNN whether it has a bf16
path and then checks it by timing one small matmul each way: the decision is
what this machine does, not what its model name suggests. It is made once
per process. CPUs fall far to either side of the threshold (emulated bf16 ran
about 100x slower than float32 on one AVX2 machine; native bf16 1.7x to 4.7x
faster), so the answer does not flip between runs of one machine.

float32 and float64 stay the reference modes: parity with transformers and
`moee verify` are stated in them.
"""

from __future__ import annotations

import time
import warnings
from functools import lru_cache

import torch

from ..errors import InputError
from .onednn import linear

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bf16 must be at least this much faster than float32 in the probe to be chosen: near 1.0 the halved bytes still win
# at batch 1, well under it the CPU is emulating bf16.
BF16_MIN_SPEEDUP = 0.9


class SlowDtypeWarning(UserWarning):
    """A dtype asked for explicitly that this machine computes slowly (bf16 without bf16 units)."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto"/None: the first CUDA device where torch has one, else the CPU; "cpu", "cuda" or "cuda:N" as asked."""
    if device is None or device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device {str(device)!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {str(device)!r} was asked for, but this torch sees no CUDA device "
                             "(torch.cuda.is_available() is False); use device='cpu' (--device cpu) or a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> tuple[torch.dtype, str]:
    """(the torch dtype to compute in, why): "auto"/None chooses; a name or torch dtype is taken as asked."""
    device = torch.device(device)
    if dtype is None or dtype == "auto":
        native, why = bf16_native(device)
        return (torch.bfloat16, why) if native else (torch.float32, why)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise InputError(f"dtype {dtype} is not supported; use auto, torch.float32, torch.bfloat16, torch.float64 or torch.float16")
    if dtype == torch.bfloat16 and device.type == "cpu":
        native, why = bf16_native(device)
        if not native:
            _warn_slow_bf16(why)
    return dtype, "asked for"


@lru_cache(maxsize=None)
def _warn_slow_bf16(why: str) -> None:  # once per process, however many loads ask
    warnings.warn(f"bfloat16 was asked for, but this CPU computes it slowly ({why}); float32 is likely faster", SlowDtypeWarning, stacklevel=4)


def bf16_native(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether bf16 matmuls are native (fast) on this device, with the reason."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, f"CUDA device {torch.cuda.get_device_name(device)} computes bf16"
        return False, f"CUDA device {torch.cuda.get_device_name(device)} has no bf16"
    return _cpu_bf16()


@lru_cache(maxsize=1)
def _cpu_bf16() -> tuple[bool, str]:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    check = getattr(mkldnn, "_is_mkldnn_bf16_supported", None) if torch.backends.mkldnn.is_available() else None
    if check is None or not check():
        return False, "oneDNN reports no bf16 path on this CPU"
    speedup = _probe_speedup()
    if speedup < BF16_MIN_SPEEDUP:
        return False, f"oneDNN offers bf16 but it ran at {speedup:.2f}x float32's speed here (emulated)"
    return True, f"oneDNN bf16 on this CPU ran {speedup:.2f}x float32's speed"


def _probe_speedup(rows: int = 64, size: int = 1024, repeats: int = 7) -> float:
    """float32 time / bf16 time of one [rows, size] x [size, size] matmul, best of a few each (about 30 ms).

    The two are timed alternately, so that a stretch where another process holds the cores slows
    both sides alike and the best of each comes from quiet moments: timed one after the other, a
    busy machine made the ratio swing from 0.05x to 52x between runs.
    """
    x, w = torch.randn(rows, size), torch.randn(size, size)
    xb, wb = x.bfloat16(), w.bfloat16()
    sides = (lambda: linear(x, w), lambda: torch.nn.functional.linear(xb, wb))
    best = [float("inf"), float("inf")]
    with torch.inference_mode():
        for fn in sides:
            fn()  # the first call builds oneDNN's kernel
        for _ in range(repeats):
            for i, fn in enumerate(sides):
                start = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - start)
    return best[0] / best[1]
