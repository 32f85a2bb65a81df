"""Settings that used to end in a raw traceback or a silently broken run are refused with a clear error before any
weights load (or, for weights that became non-finite, before the export)."""

from __future__ import annotations

import pytest
import torch
from training_helpers import debug_config, debug_stage

from llavakit.errors import ConfigError, TrainingError
from llavakit.training.config_loading import config_from_dict
from llavakit.training.trainer import train


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", float("nan"), "optim.lr must be a finite number"),
        ("lr", float("inf"), "optim.lr must be a finite number"),
        ("vision_tower_lr", float("nan"), "optim.vision_tower_lr must be a finite"),
        ("weight_decay", -0.1, "optim.weight_decay must be a finite number >= 0"),
        ("max_grad_norm", float("nan"), "optim.max_grad_norm must be a finite"),
        ("betas", [0.9], r"optim.betas must be two numbers in \[0, 1\)"),
        ("betas", [0.9, 1.5], r"optim.betas must be two numbers in \[0, 1\)"),
        ("eps", 0.0, "optim.eps must be a small positive number"),
    ],
)
def test_bad_optimizer_values(tmp_path, synth, field, value, message):
    stage = debug_stage(synth, optim={"lr": 1e-3, field: value})
    with pytest.raises(ConfigError, match=message):
        config_from_dict(debug_config(tmp_path / "run", [stage]))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"seed": -1}, r"seed must be in \[0, 2\*\*32\)"),
        ({"stages": {"epochs": float("nan"), "max_steps": None}}, "epochs must be a finite positive number"),
        ({"stages": {"epochs": float("inf"), "max_steps": None}}, "epochs must be a finite positive number"),
        ({"stages": {"data": {"num_workers": -1}}}, "data.num_workers must be >= 0"),
    ],
)
def test_bad_run_values(tmp_path, synth, section, message):
    stage = debug_stage(synth, **section.pop("stages", {}))
    with pytest.raises(ConfigError, match=message):
        config_from_dict(debug_config(tmp_path / "run", [stage], **section))


def test_run_dir_that_is_a_file_is_refused_before_loading(tmp_path, synth, no_weight_loading):
    run_file = tmp_path / "run"
    run_file.write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        train(config_from_dict(debug_config(run_file, [debug_stage(synth)])))


def test_run_dir_that_cannot_be_made_is_refused_before_loading(tmp_path, synth, no_weight_loading):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"run_dir .*a-file/run cannot be written \(Not a directory\)"):
        train(config_from_dict(debug_config(blocker / "run", [debug_stage(synth)])))


def test_weights_that_became_non_finite_are_not_exported(tmp_path, synth, monkeypatch):
    # A finite but absurd step poisons the weights after the last step's (finite) gradient was checked.
    original = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    config = config_from_dict(debug_config(tmp_path / "run", [debug_stage(synth, max_steps=1)]))
    with pytest.raises(TrainingError, match="trained weights are not finite.*not exported"):
        train(config)
    assert not (tmp_path / "run" / "finetune" / "final").exists()


@pytest.mark.parametrize(
    "field",
    [
        {"projector": "linear"},
        {"template": "vicuna_v1"},
        {"select_layer": -1},
        {"image_spec": {"tile_size": 64}},
    ],
)
def test_fresh_model_fields_with_a_checkpoint_path_are_refused(tmp_path, synth, checkpoint, field):
    # With model.path the checkpoint's own projector, template and image spec are used: these would be ignored.
    name = next(iter(field))
    with pytest.raises(ConfigError, match=rf"model\.{name} builds a fresh model.*remove it"):
        config_from_dict(
            debug_config(
                tmp_path / "run",
                [debug_stage(synth)],
                model={"preset": None, "path": str(checkpoint), **field},
            )
        )
