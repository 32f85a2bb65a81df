"""Re-running a run folder with another config is refused before anything loads (the finished stages would be
silently kept from the old config); only logging may change, and the same config resumes as before."""

from __future__ import annotations

import pytest
import yaml
from training_helpers import debug_config, debug_stage

from llavakit.errors import ConfigError
from llavakit.training.config_loading import config_from_dict
from llavakit.training.trainer import train


@pytest.fixture
def finished_run(tmp_path, synth):
    data = debug_config(tmp_path / "run", [debug_stage(synth, max_steps=1)])
    train(config_from_dict(data))
    return data


def test_a_changed_config_is_refused_naming_the_keys(finished_run, no_weight_loading):
    changed = {
        **finished_run,
        "stages": [{**finished_run["stages"][0], "optim": {"lr": 5e-4, "warmup_ratio": 0.0}}],
    }
    changed["seed"] = 7
    with pytest.raises(
        ConfigError, match=r"stages\.0\.optim\.lr: 0\.001 -> 0\.0005.*seed: 42 -> 7.*new run_dir"
    ):
        train(config_from_dict(changed))


def test_logging_may_change_and_the_same_config_reruns(finished_run, tmp_path):
    rerun = {**finished_run, "logging": {**finished_run["logging"], "log_every": 5}}
    result = train(config_from_dict(rerun))
    assert result.final_checkpoint.is_dir()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["logging"]["log_every"] == 5


def test_a_config_saved_before_a_field_existed_still_matches(finished_run, tmp_path):
    saved_file = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(saved_file.read_text())
    del saved["strategy"]["loss_kernel"]  # as written by a llavakit without that field
    saved_file.write_text(yaml.safe_dump(saved))
    assert train(config_from_dict(finished_run)).final_checkpoint.is_dir()
