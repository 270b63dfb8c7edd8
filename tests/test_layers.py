"""The matmul every layer goes through: `layers.linear`, oneDNN for float32 on the CPU, F.linear otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moee_ref import layers
from moee_ref.layers import Linear, RoutedExperts, linear, onednn_applies

ONEDNN = layers._ONEDNN_LINEAR is not None
FP32_REL = 1e-6  # float32 rounding of a 256-term dot product, relative to the output's largest value


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("shape", [(1, 256), (5, 256), (3, 7, 256), (2, 3, 4, 256)], ids=["1row", "5rows", "3d", "4d"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float64(shape, bias):
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(*shape, generator=generator), torch.randn(96, 256, generator=generator)
    b = torch.randn(96, generator=generator) if bias else None
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    out = linear(x, weight, b)
    assert out.shape == (*shape[:-1], 96) and out.dtype == torch.float32
    assert rel_error(out, exact) <= FP32_REL


def test_linear_takes_views_and_empty_inputs():
    generator = torch.Generator().manual_seed(1)
    stacked = torch.randn(4, 96, 256, generator=generator)
    x = torch.randn(256, 9, generator=generator).t()  # not contiguous
    assert rel_error(linear(x, stacked[2]), F.linear(x.double(), stacked[2].double())) <= FP32_REL
    assert linear(torch.empty(0, 256), stacked[0]).shape == (0, 96)


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
def test_float32_without_gradients_goes_through_onednn(monkeypatch):
    calls = []
    real = layers._ONEDNN_LINEAR
    monkeypatch.setattr(layers, "_ONEDNN_LINEAR", lambda *args: calls.append(args) or real(*args))
    x, weight = torch.randn(3, 256), torch.randn(96, 256)
    linear(x, weight)
    assert len(calls) == 1
    # The other cases stay on F.linear: float64, and anything that needs a gradient (oneDNN's op has no autograd).
    linear(x.double(), weight.double())
    linear(x, weight.requires_grad_())
    linear(x, weight.detach(), torch.zeros(96, requires_grad=True))
    assert len(calls) == 1


def test_gradients_flow_where_asked():
    x = torch.randn(3, 256, requires_grad=True)
    weight = torch.randn(96, 256, requires_grad=True)
    linear(x, weight).sum().backward()
    assert torch.allclose(weight.grad, x.detach().sum(0).expand(96, -1)) and x.grad is not None
    assert not onednn_applies(x, weight)


def test_linear_module_has_no_random_init_and_uses_linear():
    module = Linear(256, 96, bias=True)
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    module.requires_grad_(False)
    x = torch.randn(2, 256)
    assert torch.equal(module(x), linear(x, module.weight, module.bias))


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
def test_experts_run_one_call_per_active_expert_through_onednn(monkeypatch):
    """With oneDNN serving float32, the experts do not take grouped_mm (MKL underneath): one matmul pair per expert."""
    generator = torch.Generator().manual_seed(2)
    experts = RoutedExperts(6, 32, 16).requires_grad_(False)
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(6, 32, 32, generator=generator))
        experts.down.copy_(torch.randn(6, 32, 16, generator=generator))
    x = torch.randn(10, 32, generator=generator)
    ids = torch.tensor([[0, 1]] * 5 + [[1, 3]] * 5)  # experts 0, 1, 3 active
    weights = torch.rand(10, 2, generator=generator)
    assert not experts.grouped_mm_ok(x)
    calls = []
    real = layers._ONEDNN_LINEAR
    monkeypatch.setattr(layers, "_ONEDNN_LINEAR", lambda *args: calls.append(args) or real(*args))
    out = experts(x, ids, weights)
    assert len(calls) == 2 * 3
    expected = torch.zeros(10, 32, dtype=torch.float64)
    for token in range(10):
        for slot in range(2):
            e = int(ids[token, slot])
            gate, up = (x[token].double() @ experts.gate_up[e].double().T).chunk(2)
            expected[token] += weights[token, slot].double() * (experts.down[e].double() @ (F.silu(gate) * up))
    assert rel_error(out, expected) <= 1e-5
