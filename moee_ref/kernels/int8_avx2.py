"""int8 x int16 matmuls with AVX2's integer dot products (int8_avx2.c), for CPUs without VNNI.

The C file is compiled once per machine with the system's C compiler (`$CC`, else cc, gcc or clang) into moee-ref's cache
folder (cache_dir.py `cache_root`), named by a hash of the source, the flags and the compiler, and loaded
with ctypes: no build step at install and no dependency beyond a compiler, which is only needed the first time.
Where there is none, or the CPU lacks AVX2, or the built kernel does not reproduce exact integer products on
extreme values, `library()` says why and kernels/int8.py keeps torch's weight-only path.

Threads: the C function computes a range of output columns; `torch.get_num_threads()` ranges run at once, one in
the calling thread and the others in a pool (ctypes releases the GIL for the call).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

from ..cache_dir import cache_root

SOURCE = Path(__file__).with_name("int8_avx2.c")
FLAGS = ("-O3", "-mavx2", "-fPIC", "-shared", "-fno-strict-aliasing")
COMPILE_SECONDS = 120


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_has_avx2() -> bool:
    # torch's own dispatch level: "AVX2" or "AVX512" on a CPU with AVX2 (and where ATEN_CPU_CAPABILITY does not cap
    # it below); the kernel follows the same cap, so a capped run measures what an AVX2-only CPU would run.
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@lru_cache(maxsize=1)
def library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel library, "") or (None, why not)."""
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "AMD64"):
        return None, "not an x86-64 Linux machine"
    if not _cpu_has_avx2():
        return None, f"the CPU (torch: {torch.backends.cpu.get_cpu_capability()}) has no AVX2"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc, gcc or clang; or $CC) to build it with"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{compiler} --version failed ({exc})"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + repr(FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"int8_avx2-{key}.so"
    if not target.is_file():
        error = _build(compiler, target)
        if error:
            return None, error
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:  # a damaged file: built again once
        target.unlink(missing_ok=True)
        error = _build(compiler, target)
        if error:
            return None, error
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as exc:
            return None, f"{target} does not load ({exc})"
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.moee_int8_quantize.argtypes = [pointer, size, size, pointer, pointer]
    lib.moee_int8_quantize.restype = None
    lib.moee_int8_matmul.argtypes = [pointer, pointer, pointer, size, size, pointer, pointer, size, size, size, pointer]
    lib.moee_int8_matmul.restype = None
    if not _exact(lib):
        return None, "the built kernel's integer products were not exact on this CPU"
    return lib, ""


def _build(compiler: str, target: Path) -> str:
    """Compile into a temporary file beside target, then rename it: a half-written library is never loaded."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".so")
        os.close(handle)
    except OSError as exc:
        return f"cannot write {target.parent} ({exc.strerror or exc})"
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", temporary], capture_output=True, text=True,
                              timeout=COMPILE_SECONDS)
        if done.returncode != 0:
            return f"{Path(compiler).name} could not build it: {done.stderr.strip().splitlines()[-1:] or done.returncode}"
        os.replace(temporary, target)
        return ""
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{Path(compiler).name} could not build it ({exc})"
    finally:
        Path(temporary).unlink(missing_ok=True)


def _exact(lib) -> bool:
    """The kernel against exact integer products: rows at the extreme levels (+-32767, every int32 sum of a chunk
    at its largest) and random ones, widths with and without a tail that is not a multiple of 16."""
    generator = torch.Generator().manual_seed(0)
    for rows, k, n in ((5, 2048 + 8, 7), (1, 40, 3)):
        x = torch.randint(-32767, 32768, (rows, k), generator=generator).float()
        x[0] = 32767.0
        x[:, 0] = 32767.0  # every row's largest |x| is 32767: its step is exactly 1
        values = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
        values[0] = 127
        values[1] = -127
        expected = x.double() @ values.double().T
        got = matmul(x, values[None], torch.ones(1, n), torch.tensor([0, rows]), lib=lib).double()
        # the integer sums are exact, and rounded to float32 once
        if not torch.allclose(got, expected, rtol=1e-6, atol=0):
            return False
    return True


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, workers, pool)


def _pool(workers: int) -> ThreadPoolExecutor:
    """The column ranges' threads: made again for more workers, and in a forked child, which inherits the pool
    object but not its threads (work submitted to it would wait forever)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < workers:
        _POOL = (os.getpid(), workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moee-int8"))
    return _POOL[2]


def matmul(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor, lib=None) -> torch.Tensor:
    """x [rows, k] float32 @ (values[e] * scale[e][:, None]).T for values [E, n, k] int8 and scale [E, n] float32, the
    rows of expert e being offsets[e] to offsets[e + 1] (offsets [E + 1], from 0 to rows). Returns [rows, n] float32."""
    lib = lib or library()[0]
    x = x.to(torch.float32).contiguous()
    rows, k = x.shape
    experts, n = values.shape[0], values.shape[1]
    if values.shape[2] != k or scale.shape != (experts, n) or offsets.shape != (experts + 1,):
        raise ValueError(f"int8 matmul shapes do not fit: x {tuple(x.shape)}, values {tuple(values.shape)}, "
                         f"scale {tuple(scale.shape)}, offsets {tuple(offsets.shape)}")
    values = values.contiguous()
    scale = scale.to(torch.float32).contiguous()
    offsets = offsets.to(torch.int64).contiguous()
    q = torch.empty(rows, k, dtype=torch.int16)
    step = torch.empty(rows, dtype=torch.float32)
    out = torch.empty(rows, n, dtype=torch.float32)
    if rows == 0:
        return out
    lib.moee_int8_quantize(x.data_ptr(), rows, k, q.data_ptr(), step.data_ptr())
    threads = max(1, min(torch.get_num_threads(), n // 2))
    cuts = [n * i // threads // 2 * 2 for i in range(threads)] + [n]  # column ranges, multiples of a tile's 2

    def run(part: int) -> None:
        lib.moee_int8_matmul(q.data_ptr(), step.data_ptr(), offsets.data_ptr(), experts, k, values.data_ptr(),
                             scale.data_ptr(), n, cuts[part], cuts[part + 1], out.data_ptr())

    others = [_pool(threads - 1).submit(run, part) for part in range(1, threads)] if threads > 1 else []
    run(0)
    for future in others:
        future.result()
    return out


def linear(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] @ (values * scale[:, None]).T + bias for one int8 matrix values [n, k] with float32 scales [n]."""
    rows = x.reshape(-1, x.shape[-1])
    out = matmul(rows, values[None], scale[None], torch.tensor([0, len(rows)]))
    out = out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias
