"""Bad configuration fails with a clear error before any model weight is loaded."""

from __future__ import annotations

import pytest
import torch
from training_helpers import debug_config, debug_stage

from llavakit.errors import CheckpointError, ConfigError
from llavakit.training.config_loading import config_from_dict
from llavakit.training.recipes import load_recipe
from llavakit.training.trainer import train


def _run(tmp_path, synth, stage_fields=None, **sections):
    train(
        config_from_dict(
            debug_config(tmp_path / "run", [debug_stage(synth, **(stage_fields or {}))], **sections)
        )
    )


def test_missing_data_file(tmp_path, synth, no_weight_loading):
    with pytest.raises(ConfigError, match=r"stages.0 \(finetune\): data.path .*nope.json.* does not exist"):
        _run(tmp_path, synth, {"data": {"path": str(tmp_path / "nope.json")}})


def test_missing_image_folder(tmp_path, synth, no_weight_loading):
    with pytest.raises(ConfigError, match="image_folder .* is not a directory"):
        _run(tmp_path, synth, {"data": {"image_folder": str(tmp_path / "no-images")}})


def test_global_batch_not_divisible(tmp_path, synth, no_weight_loading):
    with pytest.raises(
        ConfigError, match="global_batch_size 5 is not divisible by world size 1 x micro_batch_size 2"
    ):
        _run(tmp_path, synth, {"global_batch_size": 5})


def test_unknown_trainable_part_and_recipe():
    with pytest.raises(ConfigError, match=r"unknown trainable part\(s\) \['mm_vision_resampler'\]"):
        config_from_dict({"stages": [{"trainable": ["projector", "mm_vision_resampler"]}]})
    with pytest.raises(
        ConfigError, match="unknown recipe 'llava-next-34b'; shipped recipes: .*qwen2.5-0.5b-siglip"
    ):
        load_recipe("llava-next-34b")


def test_mismatched_projector_file(tmp_path, synth, preset_parts, no_weight_loading):
    parts = preset_parts("debug-clip-llama").from_parts_kwargs()
    wrong = {  # an mlp2x_gelu projector from a 32-wide encoder to a 48-wide LLM (the debug parts are 64 -> 64)
        "model.mm_projector.0.weight": torch.zeros(48, 32),
        "model.mm_projector.0.bias": torch.zeros(48),
        "model.mm_projector.2.weight": torch.zeros(48, 48),
        "model.mm_projector.2.bias": torch.zeros(48),
    }
    torch.save(wrong, tmp_path / "mm_projector.bin")
    model = {
        "preset": None,
        "vision": parts["vision"],
        "llm": parts["llm"],
        "pretrained_projector": str(tmp_path / "mm_projector.bin"),
    }
    with pytest.raises(CheckpointError, match="hidden size 64"):
        _run(tmp_path, synth, model=model)


def test_unsupported_lora_combinations(tmp_path, synth, no_weight_loading):
    with pytest.raises(ConfigError, match="QLoRA"):
        _run(tmp_path, synth, lora={"enabled": False, "bits": 4})
    with pytest.raises(ConfigError, match=r"lora.bits=8\) with strategy fsdp2 is not supported"):
        _run(tmp_path, synth, lora={"enabled": True, "bits": 8}, strategy={"name": "fsdp2"})
    with pytest.raises(ConfigError, match="cpu_offload"):
        _run(tmp_path, synth, lora={"enabled": True, "bits": 4}, strategy={"name": "fsdp2", "cpu_offload": True})


SYSTEM = {"system_prompt": "Answer the questions."}


@pytest.mark.parametrize(
    ("model", "stages", "message"),
    [
        # Set on the align stage's plain template.
        ({}, [("align", {"template": "plain", **SYSTEM})], r"stages.0 \(align\): data.system_prompt: template 'plain'"),
        # Inherited: the finetune stage trains with the Qwen preset's own template.
        (
            {"preset": "debug-siglip-qwen2"},
            [("align", {}), ("finetune", SYSTEM)],
            r"stages.1 \(finetune\): data.system_prompt: template 'qwen_2' .*hard-codes 'You are a helpful",
        ),
        # Inherited from an earlier stage's template.
        (
            {},
            [("mid", {"template": "gemma_instruct"}), ("finetune", SYSTEM)],
            r"stages.1 \(finetune\): data.system_prompt: template 'gemma_instruct' .*no system role",
        ),
    ],
)
def test_a_system_prompt_the_template_would_ignore_is_refused(tmp_path, synth, no_weight_loading, model, stages, message):
    config = debug_config(tmp_path / "run", [debug_stage(synth, name, data=data) for name, data in stages])
    config["model"].update(model)
    with pytest.raises(ConfigError, match=message):
        train(config_from_dict(config))
