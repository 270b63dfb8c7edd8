"""The saved embedding configuration: the EmbedSpec written out with alpha as a number (embedding/spec.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moee_ref.embedding.spec import EmbedSpec, load_config, save_config
from moee_ref.embedding.standardize import Standardizer
from moee_ref.errors import InputError


def test_a_config_round_trips_every_setting_and_the_standardizers_bit_for_bit(tmp_path):
    rng = np.random.default_rng(1)
    std = Standardizer.fit(rng.random((6, 5)) * 1e-3 + np.pi, kind="rw", eps=1e-6)
    spec = EmbedSpec(kind="moee-sum", prompt="prompteol", alpha="auto", pooling="mean", rw_layers=[1, 3], max_length=20,
                     truncation="left", normalize=True, standardizers=std)
    record = save_config(spec, tmp_path / "cfg.json", alpha=0.6830024)
    assert json.loads((tmp_path / "cfg.json").read_text()) == record
    loaded = load_config(tmp_path / "cfg.json")
    assert loaded == spec.replace(alpha=0.6830024)
    assert loaded.identity() == spec.replace(alpha=0.6830024).identity()  # the standardizer's digest: its very bytes
    assert loaded.standardizers[0].mean.tobytes() == std.mean.tobytes() and loaded.standardizers[0].eps == 1e-6


def test_a_config_never_holds_auto_and_refuses_what_it_does_not_know(tmp_path):
    with pytest.raises(InputError, match=r"^alpha 'auto' is not chosen yet"):
        save_config(EmbedSpec(alpha="auto"), tmp_path / "cfg.json")
    assert load_config(save_config(EmbedSpec(kind="hs"), tmp_path / "hs.json")) == EmbedSpec(kind="hs")
    base = {"format": "moee-ref embedding config", "version": 1}
    with pytest.raises(InputError, match=r"unknown setting\(s\) colour; it holds kind, prompt, alpha"):
        load_config({**base, "spec": {"kind": "hs", "colour": "blue"}})
    with pytest.raises(InputError, match=r"alpha is 'auto'; a saved configuration holds the alpha chosen, as a number"):
        load_config({**base, "spec": {"alpha": "auto"}})
    with pytest.raises(InputError, match=r"configuration version 2; this moee-ref reads version 1"):
        load_config({**base, "version": 2, "spec": {}})
    (tmp_path / "other.json").write_text("[]")
    with pytest.raises(InputError, match=r"other\.json: not an embedding configuration \(moee embed --save-config writes one\)"):
        load_config(tmp_path / "other.json")


def test_fill_takes_the_settings_left_at_their_defaults_from_the_config():
    config = EmbedSpec(kind="hs", prompt="prompteol", alpha=0.5)
    assert EmbedSpec().fill(config) == config
    assert EmbedSpec(prompt="none").fill(config) == config.replace(prompt="none")
