"""Trainer test fixtures: a small synthetic LLaVA dataset (real files, real data pipeline); run-dict helpers live in
`training_helpers` (a uniquely named module: ``from conftest import`` would name whichever folder's conftest pytest
loaded last)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A 48-scene synthetic dataset (align.json, finetune.json, images/) written once per session."""
    from llavakit.data.synth import SynthConfig, generate_synth

    return generate_synth(tmp_path_factory.mktemp("synth"), SynthConfig(n_train=48, n_heldout=1))


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Make any model construction fail the test: errors must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("model weights were loaded before the configuration error was raised")

    monkeypatch.setattr("llavakit.training.model_setup.build_model", forbidden)
    monkeypatch.setattr("llavakit.training.trainer.build_model", forbidden)
