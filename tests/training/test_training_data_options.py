"""The data options of a stage's ``data:`` section reach the dataset; the run's seed, folder and counts are used."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import debug_config, debug_stage

from llavakit.data.dataset import build_dataset
from llavakit.data.packing import PackedDataset
from llavakit.distributed import DistContext
from llavakit.errors import ConfigError
from llavakit.training.config import DataSection
from llavakit.training.config_loading import config_from_dict
from llavakit.training.data import DATA_STATS, build_train_data, data_config, train_data_factory


def stage_of(tmp_path, synth, **data):
    config = config_from_dict(debug_config(tmp_path / "run", [debug_stage(synth, data=data)], seed=7))
    return config, config.stages[0]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"truncation_policy": "cut"}, "truncation_policy 'cut' must be 'drop' or 'downscale'"),
        ({"skip_policy": "ignore"}, "skip_policy 'ignore' must be 'error' or 'skip'"),
        ({"max_skip_fraction": 1.5}, "max_skip_fraction must be between 0 and 1"),
        ({"max_tokens_per_pack": 4096}, "it needs data.packing true"),
        (
            {"max_tokens_per_pack": 100, "packing": True, "max_length": 512},
            "must be at least data.max_length",
        ),
        ({"max_tokens_per_pack": -1, "packing": True}, "must be at least data.max_length"),
    ],
)
def test_data_options_are_validated(fields, message):
    with pytest.raises(ConfigError, match=message):
        DataSection(path="d.json", **fields)


def test_options_reach_the_data_config(tmp_path, synth, preset_model):
    options = {
        "upstream_quirks": False,
        "truncation_policy": "downscale",
        "skip_policy": "skip",
        "max_skip_fraction": 0.25,
        "packing": True,
        "max_tokens_per_pack": 1024,
    }
    config, stage = stage_of(tmp_path, synth, **options)
    data = data_config(stage, preset_model("debug-clip-llama"), seed=config.seed)
    assert {name: getattr(data, name) for name in options} == options
    assert data.seed == 7 and data.pack_budget == 1024


def test_packing_budget_seed_index_and_stats(tmp_path, synth, preset_model):
    model = preset_model("debug-clip-llama")
    config, stage = stage_of(
        tmp_path, synth, packing=True, max_tokens_per_pack=1024, max_length=64, max_skip_fraction=1.0
    )
    context = DistContext(0, 1, 0, torch.device("cpu"))
    data = train_data_factory(config, context)(stage, model)
    assert isinstance(data.dataset, PackedDataset)
    assert data.dataset.budget == 1024 and data.dataset.seed == config.seed == 7
    # The stored index is what a plain in-memory scan of the same config gives.
    run_dir = tmp_path / "run"
    (stored,) = list((run_dir / ".index").iterdir())
    memory = build_dataset(data_config(stage, model, 7), model.tokenizer, model.config.image_spec)
    assert data.dataset.dataset.lengths == memory.lengths
    assert json.loads((stored / "meta.json").read_text())["stats"] == memory.stats.to_dict()
    # Truncation counts are saved with the stage's metrics (max_length 64 cuts the synthetic answers).
    saved = json.loads((run_dir / stage.name / DATA_STATS).read_text())
    assert saved == {"data_path": stage.data.path, **memory.stats.to_dict()}
    assert saved["num_truncated"] + saved["num_dropped_too_long"] > 0


def test_index_dir_option_and_no_run_dir(tmp_path, synth, preset_model):
    model = preset_model("debug-clip-llama")
    _, stage = stage_of(tmp_path, synth, index_dir=str(tmp_path / "shared-index"))
    build_train_data(stage, model)
    assert len(list((tmp_path / "shared-index").iterdir())) == 1
    assert not (tmp_path / "run").exists(), "no run_dir given: nothing written there"
