"""The shipped ``qwen2.5-0.5b-siglip`` recipe's finetune stage trains on the device at its real shapes.

The model is the ``qwen2.5-0.5b-siglip-shapes`` preset (SigLIP-so400m-384 + Qwen2.5-0.5B configs, random weights)
with the recipe's own model section (projector, select layer, template, image spec) and ``sdpa_varlen`` attention
(the recipe leaves attention at its default; upstream ran flash-attention, which ``sdpa_varlen`` stands in for).
The stage is the recipe's finetune stage (all parts trained, anyres_max_9 over (1x1)..(6x6) grids of 384 px tiles,
gradient checkpointing, modality-grouped batches) with its optimizer, and the recipe's strategy (FSDP2, bf16) in a
world of one; only the data (synthetic scenes, upscaled so that AnyRes picks grids of several tiles), the batch
(global 4, micro 1) and the length (20 steps) are the test's. It must run, keep every loss finite, and learn: the
mean loss of the last 5 steps below that of the first 5.

In the CPU dry run the preset's widths and depths and the images are shrunk (`DRY_RUN_UPSCALE`).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from gpu_helpers import DRY_RUN, debug_config
from PIL import Image

from llavakit.data.synth import SynthConfig, generate_synth
from llavakit.training.config_loading import config_from_dict
from llavakit.training.recipes import recipe_dict
from llavakit.training.trainer import train

RECIPE = "qwen2.5-0.5b-siglip"
PRESET = "qwen2.5-0.5b-siglip-shapes"
STEPS = 20
# Synthetic canvases are 64-128 px; x12 gives 768x768, 768x1536 and 1536x768 images: AnyRes grids of 2x2 and 2x4
# tiles of 384 px (plus the base view), within anyres_max_9's cap.
UPSCALE = 12
# The CPU dry run (bf16 runs slowly on CPUs): the images as drawn (one 384 px tile and the base view each) and
# narrow, shallow parts (same geometry, tokenizer and vocabulary), ~100 s on 2 cores.
DRY_RUN_UPSCALE = 1
SHRUNK = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def _large_image_synth(root: Path, upscale: int):
    synth = generate_synth(root, SynthConfig(n_train=24, n_heldout=1))
    for path in (root / "images").rglob("*.png"):
        with Image.open(path) as image:
            large = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
        large.save(path)
    return synth


def _shrink_preset(monkeypatch):
    from llavakit.model import presets

    preset = presets.PRESETS.get(PRESET)
    shrunk = functools.partial(
        presets.build_parts,
        vision_dims={**preset.vision_dims, **SHRUNK},
        llm_dims={**preset.llm_dims, **SHRUNK, "num_key_value_heads": 2},
    )
    monkeypatch.setattr(presets, "build_parts", shrunk)


def _config(tmp_path, synth):
    recipe = recipe_dict(RECIPE)
    finetune = next(stage for stage in recipe["stages"] if stage["name"] == "finetune")
    model = {key: value for key, value in recipe["model"].items() if key not in ("vision", "llm")}
    stage = {
        **finetune,
        "data": {**finetune["data"], "path": str(synth.finetune_path), "image_folder": str(synth.root)},
        "global_batch_size": 4,
        "micro_batch_size": 1,
        "max_steps": STEPS,
    }
    return debug_config(
        tmp_path / "run",
        [stage],
        model={**model, "preset": PRESET, "attn_implementation": "sdpa_varlen"},
        strategy=recipe["strategy"],
    )


def test_recipe_finetune_stage_learns_at_real_shapes(tmp_path, monkeypatch, world_of_one):
    if DRY_RUN:
        _shrink_preset(monkeypatch)
    synth = _large_image_synth(tmp_path / "synth", DRY_RUN_UPSCALE if DRY_RUN else UPSCALE)
    config = config_from_dict(_config(tmp_path, synth))
    assert config.strategy.name == "fsdp2" and config.strategy.mixed_precision == "bf16"
    assert (
        config.stages[0].gradient_checkpointing
        and config.stages[0].image_spec["aspect_ratio"] == "anyres_max_9"
    )

    losses = train(config).stages[0].losses

    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
