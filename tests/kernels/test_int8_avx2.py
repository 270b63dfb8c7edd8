"""The AVX2 int8 x int16 kernel (kernels/int8_avx2.c, built and loaded by kernels/int8_avx2.py).

Exact claims are checked exactly: integer products (rows whose levels are whole numbers come back exact), a row's
result independent of the rows beside it and of the thread count (bit for bit), the grouped call equal to one call
per expert. The quantization error is bounded per output: each activation is off by at most half its row's step,
peak / (2 * 32767). Where the kernel cannot be built (no AVX2, no compiler) the tests that need it are skipped, and
the fallback is checked by building with a compiler that fails.
"""

from __future__ import annotations

import pytest
import torch

from moee_ref.kernels import int8 as int8_kernels
from moee_ref.kernels import int8_avx2
from moee_ref.kernels.int8 import quantize_rows

LIB, WHY = int8_avx2.library()
needs_kernel = pytest.mark.skipif(LIB is None, reason=f"no AVX2 int8 kernel here: {WHY}")
TOP = 32767


@needs_kernel
@pytest.mark.parametrize("rows", [1, 4, 5, 67])  # a 4-row tile, a leftover row, more rows than a row block (64)
@pytest.mark.parametrize("width", [96, 2048 + 40])  # a multiple of 16; one with a tail past two int32 chunks
def test_error_bound(rows, width):
    """Against x @ dequantized W.T in float64, each output is off by at most sum_k |W[n, k]| * peak / (2 * 32767)
    (half a step per activation) plus float32 rounding (1e-6 of sum_k |x_k W[n, k]|); an all-zero row gives zeros."""
    generator = torch.Generator().manual_seed(21)
    weight = torch.randn(37, width, generator=generator) * torch.logspace(-2, 1, 37)[:, None]  # 37: a leftover column
    x = torch.randn(rows, width, generator=generator) * torch.logspace(-3, 2, rows)[:, None]
    x[:, 5] *= 100  # an outlier channel, as LLM activations have
    x[0] = 0.0
    values, scale = quantize_rows(weight)
    out = int8_avx2.linear(x, values, scale)
    assert out.dtype == torch.float32 and out.shape == (rows, 37)
    dequantized = values.double() * scale.double()[:, None]
    reference = x.double() @ dequantized.T
    peak = x.double().abs().amax(-1, keepdim=True)
    bound = dequantized.abs().sum(-1)[None, :] * peak / (2 * TOP) + 1e-6 * (x.double().abs() @ dequantized.abs().T) + 1e-30
    assert bool(((out.double() - reference).abs() <= bound).all()), float(((out.double() - reference).abs() / bound).max())
    assert torch.equal(out[0], torch.zeros(37))


@needs_kernel
def test_integer_products_are_exact():
    """Rows that are whole levels with their largest |x| at 32767 (a step of exactly 1) and weights at +-127: the
    largest sums an int32 lane ever holds, which the kernel moves to 64 bits before adding lanes."""
    x = torch.full((3, 4096), 32767.0)
    x[1] = -32767.0
    x[2, ::2] = -32767.0
    values = torch.full((5, 4096), 127, dtype=torch.int8)
    values[1] = -127
    out = int8_avx2.linear(x, values, torch.ones(5))
    expected = x.double() @ values.double().T  # up to 4096 * 32767 * 127 = 1.7e10: past int32
    torch.testing.assert_close(out.double(), expected, rtol=1e-7, atol=0)


@needs_kernel
def test_rows_and_threads_do_not_change_a_row(monkeypatch):
    """A text's vector must not depend on the batch it came in or on the thread count: each output is summed in one
    fixed order whatever tile or column range computes it."""
    generator = torch.Generator().manual_seed(22)
    values, scale = quantize_rows(torch.randn(70, 256, generator=generator))
    x = torch.randn(11, 256, generator=generator)
    together = int8_avx2.linear(x, values, scale)
    alone = torch.cat([int8_avx2.linear(x[i : i + 1], values, scale) for i in range(len(x))])
    assert torch.equal(together, alone)
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            assert torch.equal(int8_avx2.linear(x, values, scale), together), count
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_grouped_call_equals_one_call_per_expert():
    generator = torch.Generator().manual_seed(23)
    values, scale = quantize_rows(torch.randn(4, 30, 64, generator=generator))
    counts = torch.tensor([3, 0, 6, 1])  # an expert with no rows
    x = torch.randn(int(counts.sum()), 64, generator=generator)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    grouped = int8_avx2.matmul(x, values, scale, offsets)
    for e in range(4):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        assert torch.equal(grouped[rows], int8_avx2.linear(x[rows], values[e], scale[e])), e


@needs_kernel
def test_shapes_that_do_not_fit_are_refused():
    values, scale = quantize_rows(torch.randn(2, 8, 32))
    with pytest.raises(ValueError, match=r"int8 matmul shapes do not fit: x \(3, 16\), values \(2, 8, 32\), scale \(2, 8\), offsets \(3,\)"):
        int8_avx2.matmul(torch.randn(3, 16), values, scale, torch.tensor([0, 1, 3]))


def test_no_compiler_keeps_the_weight_only_path(monkeypatch, tmp_path):
    """A compiler that fails: nothing is left in the cache folder, the reason says why, and the int8 choice falls
    back to the weight-only path rather than failing the load."""
    if not int8_avx2._cpu_has_avx2():
        pytest.skip("no AVX2 here: the kernel is never built")
    monkeypatch.setenv("MOEE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits 1 whatever it is given
    monkeypatch.setattr(int8_avx2, "_compiler", lambda: "/bin/false")
    int8_avx2.library.cache_clear()
    int8_kernels._integer_decision.cache_clear()
    try:
        lib, why = int8_avx2.library()
        assert lib is None and why.startswith("false could not build it"), why
        assert not any(p.is_file() for p in tmp_path.rglob("*")), list(tmp_path.rglob("*"))
        monkeypatch.setenv(int8_kernels.KERNEL_ENV, "avx2")
        assert int8_kernels.integer_path(torch.float32) is None
        assert int8_kernels.integer_reason(torch.float32).startswith("weight-only int8 (no AVX2 integer kernel: false could not build it")
    finally:
        int8_avx2.library.cache_clear()
        int8_kernels._integer_decision.cache_clear()


@needs_kernel
def test_damaged_library_is_built_again(monkeypatch, tmp_path):
    """A library file that does not load (truncated, overwritten) is built again. The damaged one is made in a
    second cache folder: overwriting a library this process has mapped would crash it, which is why builds rename."""
    monkeypatch.setenv("MOEE_CACHE_DIR", str(tmp_path / "first"))
    int8_avx2.library.cache_clear()
    try:
        lib, why = int8_avx2.library()
        assert lib is not None, why
        (built,) = (tmp_path / "first" / "kernels").glob("int8_avx2-*.so")
        damaged = tmp_path / "second" / "kernels" / built.name
        damaged.parent.mkdir(parents=True)
        damaged.write_bytes(b"not a shared library")
        monkeypatch.setenv("MOEE_CACHE_DIR", str(tmp_path / "second"))
        int8_avx2.library.cache_clear()
        lib, why = int8_avx2.library()
        assert lib is not None, why
        assert damaged.read_bytes() == built.read_bytes() and list(damaged.parent.iterdir()) == [damaged]
    finally:
        int8_avx2.library.cache_clear()


@needs_kernel
def test_works_in_a_forked_child():
    """A child forked after the threads were made (a multiprocessing worker) makes its own: it inherits the pool
    object but not its threads."""
    import multiprocessing

    values, scale = quantize_rows(torch.randn(64, 128, generator=torch.Generator().manual_seed(24)))
    x = torch.randn(5, 128)
    expected = int8_avx2.linear(x, values, scale)  # the parent's pool exists now
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two column ranges: one runs in the pool
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            got = pool.apply_async(_child_linear, (x, values, scale)).get(timeout=60)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, expected)


def _child_linear(x, values, scale):
    torch.set_num_threads(2)
    return int8_avx2.linear(x, values, scale)
