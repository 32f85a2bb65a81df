"""Every shipped recipe builds with the debug model substituted and trains one step per stage."""

from __future__ import annotations

import math

import pytest

from llavakit.training.config_loading import config_from_dict
from llavakit.training.recipes import load_recipe, recipe_dict, recipe_names, resolve_config
from llavakit.training.trainer import train

# Published values the recipe files must carry (features.md 8.1, seeds 000-003): (stage, global batch, lr, vision lr).
PUBLISHED = {
    "open-llava-next-vicuna-7b": [("align", 256, 1e-3, None), ("finetune", 128, 2e-5, 2e-6)],
    "open-llava-next-llama3-8b": [("align", 256, 1e-3, None), ("finetune", 128, 2e-5, 2e-6)],
    "llava-next-qwen1.5-72b": [("align", 256, 1e-3, None), ("finetune", 128, 1e-5, 2e-6)],
    "qwen2.5-0.5b-siglip": [("align", 64, 1e-3, None), ("mid", 32, 1e-5, 2e-6), ("finetune", 64, 1e-5, 2e-6)],
    "llava-1.5-vicuna-7b": [("align", 256, 1e-3, None), ("finetune", 128, 2e-5, None)],
}

# The debug model substituted per recipe: the preset whose tokenizer has the template's special tokens. No preset has
# Llama-3's header tokens, so the llama3 recipe runs its stages with the vicuna_v1 template instead. Recipes not
# listed (e.g. the demo's) use debug-clip-llama with their own templates.
DEBUG_MODEL = {
    "open-llava-next-vicuna-7b": ("debug-clip-llama", None),
    "open-llava-next-llama3-8b": ("debug-clip-llama", "vicuna_v1"),
    "llava-next-qwen1.5-72b": ("debug-siglip-qwen2", None),
    "qwen2.5-0.5b-siglip": ("debug-siglip-qwen2", None),
    "llava-1.5-vicuna-7b": ("debug-clip-llama", None),
}


def test_every_recipe_is_listed_with_its_published_values():
    assert set(PUBLISHED) <= set(recipe_names())
    for name, stages in PUBLISHED.items():
        config = load_recipe(name)
        got = [(s.name, s.global_batch_size, s.optim.lr, s.optim.vision_tower_lr) for s in config.stages]
        assert got == stages, name
        for stage in config.stages:
            assert (stage.optim.warmup_ratio, stage.optim.schedule, stage.optim.weight_decay) == (
                0.03,
                "cosine",
                0.0,
            )
            assert stage.epochs == 1


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_runs_one_step_with_the_debug_model(tmp_path, synth, name):
    data = recipe_dict(name)
    data["run_dir"] = str(tmp_path / "run")
    preset, template = DEBUG_MODEL.get(name, ("debug-clip-llama", None))
    # The recipe's attention stays: its data settings may need it (demo-tiny's padding_free needs sdpa_varlen).
    data["model"] = {"preset": preset, "attn_implementation": data["model"].get("attn_implementation", "sdpa")}
    data["strategy"] = {**data["strategy"], "name": "single", "compile": False}
    data["logging"] = {"report_to": "none", "progress_bar": False}
    for stage in data["stages"]:
        stage["data"].update(
            path=str(synth.align_path if stage["name"] == "align" else synth.finetune_path),
            image_folder=str(synth.root),
            max_length=512,
        )
        if template and stage["data"]["template"] != "plain":
            stage["data"]["template"] = template
        stage.update(global_batch_size=4, micro_batch_size=2, max_steps=1, gradient_checkpointing=False)
    result = train(config_from_dict(data))
    assert [len(stage.losses) for stage in result.stages] == [1] * len(data["stages"])
    assert all(math.isfinite(stage.losses[0]) for stage in result.stages)
    assert (result.stages[0].projector_file is not None) == (data["stages"][0]["trainable"] == ["projector"])


def test_config_file_merges_over_a_recipe(tmp_path):
    override = tmp_path / "mine.yaml"
    override.write_text("stages:\n  - data: {path: mine.json}\n  - optim: {lr: 3.0e-5}\n")
    config = resolve_config(str(override), "llava-1.5-vicuna-7b", ["run_dir=runs/mine"])
    assert config.stages[0].data.path == "mine.json" and config.stages[0].optim.lr == 1e-3
    assert config.stages[1].optim.lr == 3e-5 and config.stages[1].global_batch_size == 128
    assert config.run_dir == "runs/mine"
