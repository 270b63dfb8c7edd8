"""device=: the model on a CUDA device where one is present, a clear error where not (kernels/precision.py
`resolve_device`). The CUDA cases skip without a GPU; the CPU cases always run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moee_ref import MoEEmbedder, load_model
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint
from moee_ref.errors import InputError
from moee_ref.kernels.precision import resolve_device

TEXTS = ["A man plays a guitar.", "The market fell sharply today.", "Cats sleep on warm windowsills."]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: the CUDA path is untested here")


@pytest.fixture(scope="module", params=sorted(SMALL_CONFIGS))
def model_dir(request, tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("device") / request.param, SMALL_CONFIGS[request.param], seed=6)


@pytest.mark.parametrize("device, message", [
    ("gpu", "unknown device 'gpu'; use auto, cpu, cuda or cuda:N"),
    ("meta", "device 'meta' is not supported; use auto, cpu, cuda or cuda:N"),
])
def test_bad_devices(device, message):
    with pytest.raises(InputError, match=f"^{message}$"):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the no-CUDA error cannot happen")
def test_cuda_without_cuda_is_a_clear_error(model_dir):
    with pytest.raises(InputError, match=r"^device 'cuda' was asked for, but this torch sees no CUDA device \(torch.cuda.is_available\(\) "
                                         r"is False\); use device='cpu' \(--device cpu\) or a CUDA build of torch$"):
        MoEEmbedder.from_pretrained(model_dir, device="cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_explicit_cpu_equals_the_default(model_dir):
    a = MoEEmbedder.from_pretrained(model_dir, dtype=torch.float32, device="cpu").encode(TEXTS, "moee-concat")
    b = MoEEmbedder.from_pretrained(model_dir, dtype=torch.float32).encode(TEXTS, "moee-concat")
    np.testing.assert_array_equal(a, b)


@needs_cuda
def test_cuda_float32_matches_cpu(model_dir):
    cpu, gpu = load_model(model_dir, device="cpu"), load_model(model_dir, device="cuda")
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    ids = torch.tensor([[3, 17, 99, 250, 4, 8], [1, 1, 5, 6, 7, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.inference_mode():
        a, b = cpu(ids, mask), gpu(ids, mask)
    torch.testing.assert_close(b.hidden_states.cpu(), a.hidden_states, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.router_probs.cpu(), a.router_probs, rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("int8", [False, True])
def test_cuda_embeddings_are_close_to_cpu_float32(model_dir, int8):
    ref = MoEEmbedder.from_pretrained(model_dir, dtype=torch.float32, device="cpu")
    gpu = MoEEmbedder.from_pretrained(model_dir, device="cuda", int8=int8)
    for kind in ("hs", "rw"):
        a, b = ref.encode(TEXTS, kind), gpu.encode(TEXTS, kind)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() >= (0.99 if int8 else 0.999), (kind, cos)


@needs_cuda
def test_streamed_on_cuda_matches_streamed_on_cpu(model_dir):
    """Read to the host, a layer at a time moved to the device; the activations wait in the host's store."""
    cpu = MoEEmbedder.from_pretrained(model_dir, dtype=torch.float32, memory_budget="1GB", device="cpu")
    gpu = MoEEmbedder.from_pretrained(model_dir, dtype=torch.float32, memory_budget="1GB", device="cuda")
    assert gpu.model.device == torch.device("cuda")
    for kind in ("hs", "rw"):
        np.testing.assert_allclose(gpu.encode(TEXTS, kind), cpu.encode(TEXTS, kind), rtol=1e-4, atol=1e-5)


def test_streamed_packed_on_cuda_is_refused_before_reading(model_dir):
    from moee_ref.errors import CheckpointError
    from moee_ref.loading.streamed import StreamedModel

    with pytest.raises(CheckpointError, match=r"^packed=True is oneDNN's CPU layout; stream with packed=False on a CUDA device$"):
        StreamedModel(model_dir, torch.float32, memory_budget="1GB", packed=True, device="cuda")


def test_streamed_on_a_device_too_small_is_refused_before_reading(model_dir, monkeypatch):
    """The device's free memory is checked before any layer is read or moved (so this runs without a GPU:
    the figure is what memory_available would report for a device with 1 MiB free)."""
    from moee_ref.loading import streamed
    from moee_ref.loading.memory import InsufficientMemoryError

    real = streamed.memory_available
    monkeypatch.setattr(streamed, "memory_available",
                        lambda limit=None, device=None: (2**20, "free memory of cuda") if device is not None else real(limit))
    model = streamed.StreamedModel(model_dir, torch.float32, memory_budget="1GB", device="cuda")
    built = []
    monkeypatch.setattr(model, "build_layer", lambda layer: built.append(layer))
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(InsufficientMemoryError, match=r"^the layer-streamed mode on cuda needs about .* of device memory \(two layers "
                                                      r"of .* and one batch\), more than the 1\.0 MiB there \(free memory of cuda\); "
                                                      r"nothing was read\. Lower --batch-size, add --int8, or pass device='cpu' "
                                                      r"\(--device cpu\)$"):
        model.run([(ids, mask, None)])
    assert built == [] and model.stats.weight_bytes_read == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: bench_gpu.py would run its benchmark")
def test_the_gpu_benchmark_stops_at_once_without_cuda(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"
    result = subprocess.run([sys.executable, str(script), "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"bench_gpu.py needs a CUDA device; torch {torch.__version__} sees none here")
    assert list(tmp_path.iterdir()) == []  # nothing written before the check


@pytest.mark.parametrize("setup, env, expected", [
    ("import moee_ref", {}, ("3000", "GOMP_SPINCOUNT=3000, set by moee-ref")),
    ("import moee_ref", {"OMP_WAIT_POLICY": "PASSIVE"}, (None, "OMP_WAIT_POLICY=PASSIVE as set in the environment")),
    ("import torch, moee_ref", {}, (None, "OpenMP's default spin (torch was imported before moee_ref; set GOMP_SPINCOUNT "
                                         "before starting Python)")),
], ids=["first", "user-set", "after-torch"])
def test_openmp_threads_spin_briefly_where_it_can_take_effect(setup, env, expected):
    import json
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    code = f"{setup}; import json, os; print(json.dumps([os.environ.get('GOMP_SPINCOUNT'), moee_ref.OPENMP_WAIT]))"
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    assert tuple(json.loads(out.stdout)) == expected
