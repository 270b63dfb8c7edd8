"""The embedding spec, the kinds registry and the pipeline: one EmbedSpec checked once, a new kind added through
the registry alone, results returned per call (one embedder serving threads), the memory-aware load without argparse."""

from __future__ import annotations

import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from embed_fixtures import TEXTS, build_embedder, olmoe, single_thread  # noqa: F401  (fixtures)
from moee_ref import MoEEmbedder
from moee_ref.cli import main as cli
from moee_ref.cli.common import spec_flags
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint
from moee_ref.embedding import pipeline
from moee_ref.embedding.kinds import KINDS, Kind, get_kind, register, unregister
from moee_ref.embedding.spec import EmbedSpec, FeatureOptions
from moee_ref.errors import InputError
from moee_ref.jobs.corpus import embed_corpus
from moee_ref.loading.checkpoint import choose_mode, memory_fit
from moee_ref.loading.memory import InsufficientMemoryError
from moee_ref.loading.model import EmbeddingModel

HALF_HS = "hs-first-half"  # a throwaway kind: the first half of HS


@pytest.fixture
def half_hs_kind():
    kind = register(Kind(HALF_HS, lambda hs, rw, alpha: hs[:, : hs.shape[1] // 2], lambda d_hs, d_rw: d_hs // 2))
    yield kind
    unregister(HALF_HS)
    assert HALF_HS not in KINDS


# --- a new kind through the registry alone -----------------------------------------------------------------


def test_a_registered_kind_embeds_through_encode_the_pipeline_and_a_corpus_job(olmoe, half_hs_kind, tmp_path):
    half = olmoe.args.hidden_size // 2
    expected = olmoe.encode(TEXTS, "hs", prompt="prompteol")[:, :half]
    assert olmoe.dimension(HALF_HS) == half

    np.testing.assert_array_equal(olmoe.encode(TEXTS, HALF_HS, prompt="prompteol"), expected)

    result = pipeline.run(olmoe, TEXTS, EmbedSpec(kind=HALF_HS, prompt="prompteol"))
    np.testing.assert_array_equal(result.vectors, expected)
    assert result.report.num_texts == len(TEXTS) and result.report.alpha is None

    # A corpus job in this process (the engine), and the command line's embed (its --kind choices from the registry).
    job = embed_corpus(TEXTS, EmbedSpec(kind=HALF_HS, prompt="prompteol"), source=olmoe.model.source_dir, load=lambda: olmoe,
                       output=tmp_path / "job.npy", fmt="npy", batch_size=olmoe.batch_size)
    np.testing.assert_array_equal(np.load(tmp_path / "job.npy", allow_pickle=False), expected)
    np.testing.assert_array_equal(job.vectors, expected)
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    code = cli.main(["embed", "--model", str(olmoe.model.source_dir), "--input", str(tmp_path / "texts.txt"), "--output",
                     str(tmp_path / "cli.npy"), "--kind", HALF_HS, "--prompt", "prompteol", "--dtype", "float32", "--no-progress"])
    assert code == 0
    np.testing.assert_allclose(np.load(tmp_path / "cli.npy", allow_pickle=False), expected, rtol=1e-5, atol=1e-6)


def test_the_official_mode_refuses_a_kind_the_authors_code_does_not_have(olmoe, half_hs_kind):
    with pytest.raises(InputError, match=rf"^kind '{HALF_HS}' is not in the authors' code; the official mode computes "
                                         r"hs, rw, moee-concat, moee-sum$"):
        EmbedSpec(kind=HALF_HS, mode="official").check()


def test_a_kind_name_is_registered_once():
    with pytest.raises(InputError, match=r"^an embedding kind named 'hs' is registered already$"):
        register(Kind("hs", lambda hs, rw, alpha: hs, lambda d_hs, d_rw: d_hs))
    assert get_kind("hs") is KINDS["hs"]


# --- the spec --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"kind": "moe"}, r"^kind='moe' is not valid; choose one of hs, rw, moee-concat, moee-sum$"),
    ({"alpha": -1}, r"^alpha must be a finite number >= 0, 'auto' or an AlphaChoice; got -1$"),
    ({"alpha": "best"}, r"^alpha='best' is not valid; give a number >= 0, 'auto' or an AlphaChoice$"),
    ({"mode": "official", "alpha": "auto"}, r"^alpha must be a finite number >= 0 \(the official mode takes a fixed alpha"),
    ({"pooling": "max"}, r"^pooling='max' is not valid; choose one of 'last', 'mean'$"),
    ({"instruction": "Retrieve."}, r"^instruction and ensemble are settings of the official mode \(mode='official'\)$"),
    ({"mode": "fast"}, r"^mode='fast' is not valid; choose one of default, official$"),
    ({"prompt": "promptoel"}, r"promptoel"),
])
def test_check_refuses_each_bad_setting_by_name(changes, message):
    with pytest.raises(InputError, match=message):
        EmbedSpec(**changes).check()


def test_a_spec_is_frozen_and_its_identity_is_json(olmoe):
    spec = EmbedSpec(kind="rw", prompt="prompteol", rw_layers=[1, 2])
    assert spec.rw_layers == (1, 2)  # a list given becomes a tuple: nothing inside a spec changes
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.kind = "hs"
    identity = spec.identity()
    assert json.loads(json.dumps(identity)) == identity
    assert identity["kind"] == "rw" and identity["rw_layers"] == [1, 2] and identity["standardizers"] is None
    assert spec.replace(kind="hs").identity() != identity
    assert spec.features == FeatureOptions(prompt="prompteol", rw_layers=(1, 2))
    standardizer = olmoe.fit_standardizer(TEXTS, "rw")
    with_std = spec.replace(standardizers=standardizer)
    assert with_std.standardizers == (standardizer,) and len(with_std.identity()["standardizers"]) == 12


def test_every_spec_setting_has_one_flag_and_embed_takes_them_all():
    fields = [f.name for f in dataclasses.fields(EmbedSpec)]
    assert sorted(spec_flags()) == sorted(fields)
    flags = {action.option_strings[0] for action in next(
        a for a in cli.build_parser()._actions if a.dest == "command").choices["embed"]._actions if action.option_strings}
    assert {spec_flags()[name][0][0] for name in fields} <= flags


# --- results returned, one embedder for many threads --------------------------------------------------------


CALLS = [("hs", None), ("rw", "prompteol"), ("moee-concat", None), ("moee-sum", "prompteol"), ("moee-sum", "sentiment"),
         ("hs", "prompteol"), ("rw", None), ("moee-concat", "prompteol")]


def test_eight_threads_on_one_embedder_each_get_their_own_result(olmoe):
    alphas = [0.5 * (i + 1) for i in range(len(CALLS))]
    expected = {batch: [olmoe.encode(TEXTS, kind, prompt=prompt, batch_size=batch, **({"alpha": a} if kind == "moee-sum" else {}))
                        for (kind, prompt), a in zip(CALLS, alphas)] for batch in (2, 3)}
    start = threading.Barrier(len(CALLS))

    def call(i):
        kind, prompt = CALLS[i]
        spec = EmbedSpec(kind=kind, prompt=prompt, alpha=alphas[i] if kind == "moee-sum" else 1.0)
        start.wait()  # all at once
        return pipeline.run(olmoe, TEXTS, spec, batch_size=3)

    threads = torch.get_num_threads()
    with ThreadPoolExecutor(len(CALLS)) as pool:
        results = list(pool.map(call, range(len(CALLS))))
    assert torch.get_num_threads() == threads
    for (kind, _), alpha, result, want in zip(CALLS, alphas, results, expected[3]):
        assert np.abs(result.vectors - want).max() <= 1e-5 * np.abs(want).max()  # float32 rounding at most
        assert result.report.alpha == (alpha if kind == "moee-sum" else None)

    # encode() from threads too: its own vectors every time (last_report is a convenience, never read back).
    with ThreadPoolExecutor(len(CALLS)) as pool:
        got = list(pool.map(lambda i: olmoe.encode(TEXTS, CALLS[i][0], prompt=CALLS[i][1], batch_size=2,
                                                    **({"alpha": alphas[i]} if CALLS[i][0] == "moee-sum" else {})), range(len(CALLS))))
    for vectors, want in zip(got, expected[2]):
        assert np.abs(vectors - want).max() <= 1e-5 * np.abs(want).max()


# --- the model interface and the memory-aware load ------------------------------------------------------------


def test_resident_and_streamed_models_are_embedding_models(tmp_path):
    directory = write_random_checkpoint(tmp_path / "model", SMALL_CONFIGS["olmoe"], seed=3)
    resident = MoEEmbedder.from_pretrained(directory, dtype=torch.float32)
    streamed = MoEEmbedder.from_pretrained(directory, dtype=torch.float32, memory_budget="1GB")
    for embedder in (resident, streamed):
        assert isinstance(embedder.model, EmbeddingModel)
        assert embedder.model.int8 is False and embedder.model.source_dir == directory
    np.testing.assert_allclose(streamed.encode(TEXTS, "moee-sum"), resident.encode(TEXTS, "moee-sum"), rtol=1e-5, atol=1e-6)


def test_fit_auto_chooses_the_mode_that_fits_without_argparse(tmp_path):
    directory = write_random_checkpoint(tmp_path / "model", SMALL_CONFIGS["deepseek"], seed=4)
    reference = MoEEmbedder.from_pretrained(directory, dtype=torch.float32)
    assert reference.load_note is None
    roomy, note = choose_mode(directory, torch.float32, "64GB")
    assert note is None and not roomy.int8 and roomy.memory_budget is None
    fitted = MoEEmbedder.from_pretrained(directory, dtype=torch.float32, fit="auto", memory_limit="64GB")
    assert fitted.load_note is None and not fitted.streamed and not fitted.model.int8
    # A limit one byte under what float32 resident needs: the next mode that fits (int8), said in load_note.
    need = memory_fit(directory)["modes"][0]["need_bytes"]
    small = MoEEmbedder.from_pretrained(directory, dtype=torch.float32, fit="auto", memory_limit=need - 1)
    assert small.model.int8 and not small.streamed
    assert small.load_note.startswith("resident float32 needs about") and "running resident int8" in small.load_note
    np.testing.assert_array_equal(small.encode(TEXTS, "hs"), MoEEmbedder.from_pretrained(directory, dtype=torch.float32, int8=True).encode(TEXTS, "hs"))
    with pytest.raises(InsufficientMemoryError):  # without fit, the mode asked for or a refusal before any read
        MoEEmbedder.from_pretrained(directory, dtype=torch.float32, memory_limit=need - 1)
    with pytest.raises(InputError, match=r"^fit='best' is not valid; choose 'auto' \(the first mode that fits memory\) or None$"):
        MoEEmbedder.from_pretrained(directory, fit="best")
