"""Upstream train_mem.py command lines map onto the typed config, and a seed script runs unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llavakit.data.templates import get_template
from llavakit.errors import ConfigError
from llavakit.training.upstream_flags import config_from_upstream_flags, deepspeed_to_fsdp, parse_flag_tokens

# Seed 002 (henrywch/Vision_LLM), stage 2 finetune script, flags in the script's order; only paths and model ids are
# replaced (placeholders filled by `_seed_finetune_args`).
SEED_FINETUNE = """
--deepspeed scripts/zero3.json --model_name_or_path {prev} --version qwen_1_5 --data_path {data}
--image_folder {images} --mm_tunable_parts=mm_vision_tower,mm_mlp_adapter,mm_language_model --mm_vision_tower_lr=2e-6
--vision_tower {vision} --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --mm_use_im_start_end False
--mm_use_im_patch_token False --group_by_modality_length True --image_aspect_ratio anyres_max_9
--image_grid_pinpoints (1x1),...,(6x6) --mm_patch_merge_type spatial_unpad --bf16 True --run_name {run_name}
--output_dir {out} --num_train_epochs 1 --per_device_train_batch_size 1 --per_device_eval_batch_size 1
--gradient_accumulation_steps 16 --evaluation_strategy no --save_strategy steps --save_steps 500
--save_total_limit 1 --learning_rate 1e-5 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine
--logging_steps 2 --tf32 True --model_max_length 32768 --gradient_checkpointing True --dataloader_num_workers 4
--lazy_preprocess True --report_to tensorboard --dataloader_drop_last True --torch_compile False
--attn_implementation flash_attention_2
"""


def _seed_finetune_args(**paths: str) -> list[str]:
    return SEED_FINETUNE.format(**paths).split()


def test_seed_finetune_flags_map_onto_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    args = _seed_finetune_args(
        prev=str(tmp_path / "prev"),
        data="d.json",
        images="img",
        vision="v",
        run_name="r",
        out=str(tmp_path / "out"),
    )
    config = config_from_upstream_flags(args)
    stage = config.stages[0]
    assert config.model.path == str(tmp_path / "prev")
    assert stage.name == "finetune" and stage.trainable == ("vision_tower", "projector", "language_model")
    assert (stage.global_batch_size, stage.micro_batch_size) == (1 * 16 * 4, 1)
    assert (stage.optim.lr, stage.optim.vision_tower_lr, stage.optim.projector_lr) == (1e-5, 2e-6, None)
    assert (stage.optim.warmup_ratio, stage.optim.schedule, stage.optim.weight_decay) == (0.03, "cosine", 0.0)
    assert not stage.optim.fused  # no --optim: upstream's default, adamw_torch
    assert (
        stage.data.template == "qwen_1_5"
        and stage.data.max_length == 32768
        and stage.data.group_by_modality_length
    )
    assert stage.image_spec == {
        "aspect_ratio": "anyres_max_9",
        "merge_type": "spatial_unpad",
        "pinpoints": "(1x1),...,(6x6)",
    }
    assert stage.gradient_checkpointing and stage.epochs == 1
    assert (config.strategy.name, config.strategy.reshard_after_forward, config.strategy.mixed_precision) == (
        "fsdp2",
        True,
        "bf16",
    )
    assert (config.logging.save_every, config.logging.save_total_limit, config.logging.report_to) == (
        500,
        1,
        "tensorboard",
    )


def test_legacy_pretrain_flags_make_an_align_stage(tmp_path):
    args = [
        "--model_name_or_path",
        "llm",
        "--vision_tower",
        "vit",
        "--tune_mm_mlp_adapter",
        "True",
        "--data_path",
        "d.json",
        "--output_dir",
        str(tmp_path),
        "--mm_use_im_start_end",
        "False",
        "--pretrain_mm_mlp_adapter",
        "p.bin",
        "--version",
        "v1",
    ]
    config = config_from_upstream_flags(args)
    assert config.stages[0].name == "align" and config.stages[0].trainable == ("projector",)
    assert (
        config.model.llm == "llm"
        and config.model.vision == "vit"
        and config.model.pretrained_projector == "p.bin"
    )
    assert config.stages[0].data.template == "v1"  # upstream's alias, kept as given and resolved by the registry
    assert get_template(config.stages[0].data.template).id == "vicuna_v1"
    assert not (config.stages[0].data.group_by_length or config.stages[0].data.group_by_modality_length)
    assert config.model.image_spec == {"aspect_ratio": "square", "merge_type": "flat", "unpad_rounding": "floor"}
    grouped = config_from_upstream_flags([*args, "--group_by_length", "True"])
    assert grouped.stages[0].data.group_by_length and not grouped.stages[0].data.group_by_modality_length
    unfrozen = config_from_upstream_flags(
        [*args[:4], "--unfreeze_mm_vision_tower", "--data_path", "d", "--output_dir", "o"]
    )
    assert unfrozen.stages[0].trainable == ("vision_tower", "projector", "language_model")


def test_unknown_flags_and_unsupported_values_are_named(tmp_path):
    base = ["--model_name_or_path", "llm", "--vision_tower", "vit", "--data_path", "d", "--output_dir", "o"]
    with pytest.raises(ConfigError, match="--mm_resampler_type, --s2"):
        config_from_upstream_flags([*base, "--s2", "True", "--mm_resampler_type", "spatial_pool"])
    with pytest.raises(ConfigError, match="--mm_use_im_start_end True is not supported"):
        config_from_upstream_flags([*base, "--mm_use_im_start_end", "True"])
    with pytest.raises(ConfigError, match="unknown part"):
        config_from_upstream_flags([*base, "--mm_tunable_parts", "mm_vision_resampler"])
    with pytest.raises(ConfigError, match="--optim adafactor is not supported"):
        config_from_upstream_flags([*base, "--optim", "adafactor"])
    assert config_from_upstream_flags([*base, "--optim", "adamw_torch_fused"]).stages[0].optim.fused


def test_deepspeed_json_maps_to_fsdp2(tmp_path):
    zero2 = tmp_path / "ds2.json"
    zero2.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}))
    zero3 = tmp_path / "ds3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    assert deepspeed_to_fsdp(str(zero2)) == {
        "name": "fsdp2",
        "reshard_after_forward": False,
        "cpu_offload": False,
    }
    assert deepspeed_to_fsdp(str(zero3)) == {
        "name": "fsdp2",
        "reshard_after_forward": True,
        "cpu_offload": True,
    }
    assert deepspeed_to_fsdp("scripts/zero3_offload.json")["cpu_offload"] is True
    with pytest.raises(ConfigError, match="file not found"):
        deepspeed_to_fsdp(str(tmp_path / "mine.json"))


def test_flag_token_forms():
    assert parse_flag_tokens(["--a", "1", "--b=x=y", "--c", "--d", "False"]) == {
        "a": "1",
        "b": "x=y",
        "c": "True",
        "d": "False",
    }


@pytest.mark.slow
def test_seed_finetune_script_runs_through_the_cli(tmp_path, synth, preset_model):
    previous = preset_model("debug-siglip-qwen2").save_pretrained(tmp_path / "prev")
    vision = tmp_path / "prev"  # ignored for a previous-stage checkpoint, as upstream's loader does
    # One global batch of the seed's size (1 x 16 accumulation): the first 16 samples of the synthetic set.
    subset = tmp_path / "finetune16.json"
    subset.write_text(json.dumps(json.loads(synth.finetune_path.read_text())[:16]))
    args = _seed_finetune_args(
        prev=str(previous),
        data=str(subset),
        images=str(synth.root),
        vision=str(vision),
        run_name="seed-ft",
        out=str(tmp_path / "out"),
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "llavakit.cli.main", "train", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final model:" in done.stdout
    assert (tmp_path / "out" / "finetune" / "final" / "config.json").is_file()
    rows = [
        json.loads(line)
        for line in (tmp_path / "out" / "finetune" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows and all(row["loss"] > 0 for row in rows)


def test_print_config_shows_what_upstream_flags_resolve_to(tmp_path, monkeypatch, capsys):
    import yaml

    from llavakit.cli.main import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    args = _seed_finetune_args(
        prev=str(tmp_path / "prev"),
        data="d.json",
        images="img",
        vision="v",
        run_name="r",
        out=str(tmp_path / "out"),
    )
    assert main(["train", *args, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == config_from_upstream_flags(args).to_dict()
    assert printed["stages"][0]["global_batch_size"] == 64 and printed["strategy"]["name"] == "fsdp2"
    assert not (tmp_path / "out").exists()  # printed, not trained


# Upstream LLaVA-1.5's scripts/v1_5/finetune_lora.sh (ZeRO-3), flags in the script's order; only paths replaced.
UPSTREAM_FINETUNE_LORA = """
--lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 --deepspeed ./scripts/zero3.json
--model_name_or_path {llm} --version v1 --data_path {data} --image_folder {images} --vision_tower {vision}
--pretrain_mm_mlp_adapter {projector} --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2
--mm_use_im_start_end False --mm_use_im_patch_token False --image_aspect_ratio pad --group_by_modality_length True
--bf16 True --output_dir {out} --num_train_epochs 1 --per_device_train_batch_size 16 --per_device_eval_batch_size 4
--gradient_accumulation_steps 1 --evaluation_strategy no --save_strategy steps --save_steps 50000
--save_total_limit 1 --learning_rate 2e-4 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine
--logging_steps 1 --tf32 True --model_max_length 2048 --gradient_checkpointing True --dataloader_num_workers 4
--lazy_preprocess True --report_to wandb
"""


def test_upstream_finetune_lora_script_maps_to_lora_under_fsdp2(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    args = UPSTREAM_FINETUNE_LORA.format(
        llm="lmsys/vicuna-13b-v1.5",
        data=tmp_path / "llava_v1_5_mix665k.json",
        images=tmp_path,
        vision="openai/clip-vit-large-patch14-336",
        projector=tmp_path / "mm_projector.bin",
        out=tmp_path / "out",
    ).split()
    config = config_from_upstream_flags(args)
    assert config.lora.enabled and (config.lora.r, config.lora.alpha) == (128, 256)
    assert config.strategy.name == "fsdp2" and config.strategy.reshard_after_forward  # ZeRO-3
    stage = config.stages[0]
    assert stage.name == "finetune" and stage.optim.projector_lr == 2e-5 and stage.optim.lr == 2e-4
    assert get_template(stage.data.template).id == "vicuna_v1"
    assert config.model.llm == "lmsys/vicuna-13b-v1.5"
    assert config.model.pretrained_projector == str(tmp_path / "mm_projector.bin")
    assert config.model.image_spec["aspect_ratio"] == "pad"
    assert stage.data.num_workers == 4 and stage.gradient_checkpointing
