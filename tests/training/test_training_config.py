"""Typed config: YAML + dotted overrides, validation before any model is loaded, resolved config round trip."""

from __future__ import annotations

import pytest
import yaml

from llavakit.errors import ConfigError
from llavakit.training.config import StageConfig, TrainConfig
from llavakit.training.config_loading import apply_overrides, config_from_dict, load_config


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_with_overrides_types_and_star(tmp_path):
    file = _write(
        tmp_path / "run.yaml", {"model": {"preset": "debug-clip-llama"}, "stages": [{"name": "align"}, {}]}
    )
    config = load_config(
        file,
        [
            "stages.*.max_steps=3",
            "stages.1.optim.lr=1e-4",
            "strategy.name=ddp",
            "stages.0.trainable=[projector]",
        ],
    )
    assert [stage.max_steps for stage in config.stages] == [3, 3]
    assert config.stages[1].optim.lr == pytest.approx(1e-4) and isinstance(config.stages[1].optim.lr, float)
    assert config.stages[0].trainable == ("projector",)
    assert config.strategy.name == "ddp"


def test_resolved_config_round_trips(tmp_path):
    config = config_from_dict(
        {"model": {"preset": "debug-siglip-qwen2"}, "stages": [{"name": "mid", "epochs": 2}]}
    )
    config.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stages": [{"trainable": ["projector", "lm_head"]}]}, "unknown trainable part"),
        ({"stages": [{"optimm": {}}]}, "unknown key"),
        ({"stages": [{"optim": {"lr": "fast"}}]}, "expected float"),
        ({"stages": [{"name": "pretrain"}]}, "stage name"),
        ({"model": {"preset": "debug-clip-llama", "path": "x"}}, "exactly one"),
        ({"strategy": {"name": "deepspeed"}}, "strategy.name"),
        ({"stages": [{"name": "align"}, {"name": "align"}]}, "unique"),
    ],
)
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_global_batch_must_divide_world_times_micro():
    stage = StageConfig(global_batch_size=6, micro_batch_size=2)
    assert stage.accumulation_steps(world_size=3) == 1
    with pytest.raises(ConfigError, match="not divisible by world size 2 x micro_batch_size 2"):
        stage.accumulation_steps(world_size=2)


def test_override_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="out of range"):
        apply_overrides({"stages": [{}]}, ["stages.3.epochs=1"])


def test_projector_only_stage_writes_upstream_file_by_default():
    assert StageConfig(name="align", trainable=("projector",)).writes_projector
    assert not StageConfig(trainable=("projector", "language_model")).writes_projector
    assert TrainConfig().stages[0].name == "finetune"


def test_stages_record_and_inherit_the_system_prompt_with_their_template():
    from types import SimpleNamespace

    from llavakit.training.data import data_config
    from llavakit.training.model_setup import apply_stage_settings

    config = config_from_dict(
        {
            "model": {"preset": "debug-clip-llama"},
            "stages": [
                {"name": "align", "data": {"template": "plain"}},
                {"name": "mid", "data": {"template": "llava_v1", "system_prompt": "Answer the questions."}},
                {"name": "finetune"},
            ],
        }
    )
    model = SimpleNamespace(config=SimpleNamespace(template="vicuna_v1", system_prompt=None))
    seen = []
    for stage in config.stages:
        apply_stage_settings(model, stage)
        data = data_config(stage, model)
        seen.append((data.template, data.system_prompt, model.config.template, model.config.system_prompt))
    assert seen == [
        ("plain", None, "vicuna_v1", None),
        ("llava_v1", "Answer the questions.", "llava_v1", "Answer the questions."),
        ("llava_v1", "Answer the questions.", "llava_v1", "Answer the questions."),
    ]
    # A stage naming a template without a system prompt trains with that template's own.
    plain_vicuna = {"model": {"preset": "debug-clip-llama"}, "stages": [{"data": {"template": "vicuna_v1"}}]}
    apply_stage_settings(model, config_from_dict(plain_vicuna).stages[0])
    assert (model.config.template, model.config.system_prompt) == ("vicuna_v1", None)


@pytest.mark.parametrize("steps", [0, -5])
def test_non_positive_max_steps_is_refused(steps):
    with pytest.raises(ConfigError, match="max_steps must be positive"):
        StageConfig(max_steps=steps)


def test_num_workers_auto_resolves_by_device_and_cache(monkeypatch):
    import torch

    from llavakit.training.trainer import loader_workers

    config = config_from_dict({"run_dir": "r", "stages": [{"name": "finetune", "data": {"path": "d.json"}}]})
    section = config.stages[0].data
    assert section.num_workers == "auto"
    assert loader_workers(section, torch.device("cpu")) == 0
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers(section, torch.device("cuda", 0)) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers(section, torch.device("cuda", 0)) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert loader_workers(section, torch.device("cuda", 0)) == 0
    cached = config_from_dict(
        {"run_dir": "r", "stages": [{"name": "finetune", "data": {"path": "d.json", "cache_samples": True}}]}
    )
    assert loader_workers(cached.stages[0].data, torch.device("cuda", 0)) == 0
    explicit = apply_overrides(
        {"run_dir": "r", "stages": [{"name": "finetune", "data": {"path": "d.json"}}]}, ["stages.0.data.num_workers=2"]
    )
    assert loader_workers(config_from_dict(explicit).stages[0].data, torch.device("cpu")) == 2
    for bad, message in (("many", "must be 'auto' or a number"), (1.5, "expected int or str")):
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"run_dir": "r", "stages": [{"name": "finetune", "data": {"path": "d.json", "num_workers": bad}}]})
