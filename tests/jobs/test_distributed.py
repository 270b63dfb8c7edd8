"""The corpus job on Ray Data (moee_ref/distributed.py): the CLI's Ray engine and the local job agree within float32
rounding whatever the number of workers; on a two-node cluster started here, a worker killed mid-job is restarted
and every row comes back exactly once; an address that does not answer is a clear error."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="the Ray tests need the distributed extra: pip install 'moee-ref[distributed]'")
pytest.importorskip("ray.data", reason="the Ray tests need ray[data] (the distributed extra)")

from moee_ref import MoEEmbedder  # noqa: E402
from moee_ref.cli import main as cli
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint  # noqa: E402
from moee_ref.jobs.ray_engine import EmbedBatches, embed_dataset, gather, texts_dataset  # noqa: E402
from moee_ref.errors import InputError  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
TEXTS = [" ".join(["word"] * (1 + (i * 5) % 11) + [f"row {i}"]) for i in range(96)]
BATCH = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ray") / "olmoe", SMALL_CONFIGS["olmoe"], seed=31)


@pytest.fixture(scope="module")
def local_vectors(checkpoint) -> np.ndarray:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return MoEEmbedder.from_pretrained(checkpoint, dtype=torch.float32).encode(TEXTS, "moee-sum", batch_size=BATCH)
    finally:
        torch.set_num_threads(threads)


def assert_float32_close(ours, local):
    """Within float32 rounding: batches differ from the local job's, so padding and summation order do."""
    ours, local = np.asarray(ours, np.float64), np.asarray(local, np.float64)
    assert ours.shape == local.shape
    assert np.abs(ours - local).max() / np.abs(local).max() < 1e-5  # the README's float32 measure
    assert not np.array_equal(ours, np.zeros_like(ours))


def test_the_cli_on_a_local_ray_runtime_gives_the_local_job_in_input_order(checkpoint, local_vectors, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    output = tmp_path / "ray.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "moee_ref.cli.main", "embed", "--model", str(checkpoint), "--input", str(texts), "--output", str(output),
         "--dtype", "float32", "--batch-size", str(BATCH), "--no-progress", "--engine", "ray", "--workers", "2"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-1] == f"embedded 96 texts as moee-sum (128 dims) on Ray with 2 worker(s) -> {output}"
    import json

    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert records[0]["moee_ref.provenance"]["computed"]["engine"] == "ray"
    records = records[1:]
    assert [r["row"] for r in records] == list(range(96)) and [r["text"] for r in records] == TEXTS
    assert_float32_close(np.array([r["embedding"] for r in records], np.float32), local_vectors)
    assert sorted(os.listdir(tmp_path)) == ["ray.jsonl", "texts.txt"]


class DyingEmbed(EmbedBatches):
    """Kills its own process (SIGKILL: no cleanup, as a lost machine) at its first batch, once per job (a marker)."""

    def __init__(self, marker: str, **kwargs):
        super().__init__(**kwargs)
        self.marker = Path(marker)

    def __call__(self, batch):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: only one actor ever dies
        except FileExistsError:
            return super().__call__(batch)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


def test_two_nodes_a_killed_worker_every_row_once(checkpoint, local_vectors, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a cluster of this machine's processes needs no tokens
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        by_workers = {}
        for workers in (1, 2):
            marker = tmp_path / f"killed-{workers}"
            dataset = embed_dataset(texts_dataset(TEXTS, 8), str(checkpoint), workers=workers, batch_size=BATCH, dtype="float32",
                                    udf=DyingEmbed, udf_kwargs={"marker": str(marker)})
            by_workers[workers] = gather(dataset, len(TEXTS))  # raises on a row missing or twice
            assert marker.read_text().isdigit()  # a worker process did die mid-job
        for vectors in by_workers.values():
            assert_float32_close(vectors, local_vectors)
        # An expected error in a worker (here an empty text) comes back as itself, naming the row in the corpus.
        gap = TEXTS[:50] + ["  "] + TEXTS[51:]
        dataset = embed_dataset(texts_dataset(gap, 8), str(checkpoint), workers=2, batch_size=BATCH, dtype="float32",
                                udf_kwargs={"errors_as_rows": True})
        with pytest.raises(InputError, match=r"^text at index 50 is empty or whitespace only; remove it, or pass allow_empty=True"):
            gather(dataset, len(gap))
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_gather_refuses_a_row_twice_or_missing():
    class Rows:
        def __init__(self, batches):
            self.batches = batches

        def iter_batches(self, **kwargs):
            return iter(self.batches)

    one = {"id": np.array([0, 1]), "embedding": np.ones((2, 3))}
    from moee_ref.errors import MoEERefError

    with pytest.raises(MoEERefError, match=r"^the Ray job returned row 1 twice; nothing was written$"):
        gather(Rows([one, {"id": np.array([1]), "embedding": np.ones((1, 3))}]), 2)
    with pytest.raises(MoEERefError, match=r"^the Ray job returned no vector for 1 rows \(first: 2\); nothing was written$"):
        gather(Rows([one]), 3)
    np.testing.assert_array_equal(gather(Rows([{"id": np.array([1, 0]), "embedding": np.array([[1.0], [2.0]])}]), 2), [[2.0], [1.0]])


def test_an_address_that_does_not_answer_is_a_clear_error(capsys, checkpoint, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    texts = tmp_path / "texts.txt"
    texts.write_text("a\nb\n")
    code = cli.main(["embed", "--model", str(checkpoint), "--input", str(texts), "--output", str(tmp_path / "v.npy"),
                     "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"])
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        f"moee embed: error: no Ray cluster answers at 127.0.0.1:{port} (Connection refused within 5 s); check the address "
        "(`ray start --head` prints it), or drop --ray-address to run on a local Ray runtime"
    )
    assert os.listdir(tmp_path) == ["texts.txt"]


@pytest.mark.parametrize("more, refused", [
    (["--resume"], "--resume"), (["--alpha", "auto"], "--alpha auto"), (["--mode", "official", "--chunk-size", "8"], "--chunk-size, --mode official"),
])
def test_what_the_ray_engine_refuses(capsys, checkpoint, tmp_path, more, refused):
    code = cli.main(["embed", "--model", str(checkpoint), "--input", "-", "--output", str(tmp_path / "v.npy"), "--engine", "ray", *more])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"moee embed: error: --engine ray takes no {refused} (Ray retries failed work itself; batches are embedded apart, so nothing "
        "chosen over the whole corpus; every worker holds the model) (see moee embed --help)"
    )
