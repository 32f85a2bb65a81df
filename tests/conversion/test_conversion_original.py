"""Original LLaVA layout (SGLang, upstream repos) ⇄ llavakit: key maps, config mapping, exact round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from llavakit.conversion.original import export_original, import_original, original_to_ours, ours_to_original
from llavakit.errors import CheckpointError


def test_key_maps_follow_the_upstream_layout():
    assert ours_to_original("projector.linear_2.weight") == "model.mm_projector.2.weight"
    assert ours_to_original("vision_encoder.model.encoder.layers.0.mlp.fc1.bias") == (
        "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias"
    )
    assert ours_to_original("llm.model.layers.1.self_attn.q_proj.weight") == "model.layers.1.self_attn.q_proj.weight"
    assert ours_to_original("image_newline") == "model.image_newline"
    for name in ("projector.linear_1.bias", "llm.lm_head.weight", "image_newline", "vision_encoder.model.post_layernorm.weight"):
        assert original_to_ours(ours_to_original(name)) == name
    assert original_to_ours("model.layers.0.self_attn.rotary_emb.inv_freq") is None


@pytest.mark.parametrize("name", ["debug-clip-llama", "debug-siglip-qwen2"])
def test_export_then_import_is_exact(name, preset_model, preset_parts, tmp_path):
    model = preset_model(name)
    path = export_original(model, tmp_path / "original")
    config = json.loads((path / "config.json").read_text())
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["model_type"].startswith("llava_")
    spec = model.config.image_spec
    assert config["image_grid_pinpoints"] == [[w, h] for h, w in spec.pinpoints], "upstream pinpoints are (W, H)"
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        assert "model.mm_projector.0.weight" in handle.keys()
    imported = import_original(path, vision=str(preset_parts(name).vision_dir))
    assert imported.config.image_spec == spec and imported.config.select_layer == model.config.select_layer
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(imported(input_ids=ids).logits, model(input_ids=ids).logits)


def test_import_of_a_folder_that_is_not_original_fails_clearly(preset_model, tmp_path):
    path = preset_model("debug-clip-llama").save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="not an original LLaVA type"):
        import_original(path, vision=str(path))


def test_convert_cli_round_trip(preset_model, preset_parts, tmp_path):
    from llavakit.cli.main import main
    from llavakit.model.llava_next import LlavaNextModel

    model = preset_model("debug-clip-llama")
    model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "to-original", str(tmp_path / "hf"), str(tmp_path / "orig")]) == 0
    vision = str(preset_parts("debug-clip-llama").vision_dir)
    assert main(["convert", "from-original", str(tmp_path / "orig"), str(tmp_path / "back"), "--vision", vision]) == 0
    back = LlavaNextModel.from_pretrained(tmp_path / "back")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
