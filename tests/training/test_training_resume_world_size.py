"""A resume with another number of ranks than the run that saved the checkpoint is refused before any weights
load, naming both world sizes and the ways out; checkpoints of older versions (no recorded world size) too."""

from __future__ import annotations

import json
import shutil

import pytest
from training_helpers import debug_config, debug_stage

from llavakit.errors import CheckpointError
from llavakit.training.checkpoint import saved_world_size
from llavakit.training.config_loading import config_from_dict
from llavakit.training.trainer import train


@pytest.fixture
def interrupted_run(tmp_path, synth):
    """A 1-process run with a checkpoint after each step whose export is deleted (the next launch resumes it)."""
    stage = debug_stage(synth, max_steps=2)
    config = config_from_dict(debug_config(tmp_path / "run", [stage], logging={"save_every": 1}))
    train(config)
    shutil.rmtree(tmp_path / "run" / "finetune" / "final")
    return config, tmp_path / "run" / "finetune" / "checkpoints" / "step-000001"


def test_checkpoints_record_their_world_size(interrupted_run):
    _, checkpoint = interrupted_run
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 1
    assert saved_world_size(checkpoint) == 1


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "older-checkpoint"])
def test_resume_with_another_world_size_is_refused_before_loading(
    interrupted_run, monkeypatch, no_weight_loading, recorded
):
    config, checkpoint = interrupted_run
    if not recorded:
        state_file = checkpoint / "trainer_state.json"
        state = json.loads(state_file.read_text())
        del state["world_size"]
        state_file.write_text(json.dumps(state))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CheckpointError, match=r"1 rank\(s\) but this launch has 2.*delete .*checkpoints"):
        train(config)
