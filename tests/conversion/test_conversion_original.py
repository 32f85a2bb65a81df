"""Original LLaVA layout (SGLang, upstream repos) ⇄ llavakit: key maps, config mapping, exact round trips."""

from __future__ import annotations

import dataclasses
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
    # the original layout means upstream's code, whose unpadding truncates (`llavakit.anyres.spec`)
    assert imported.config.image_spec == dataclasses.replace(spec, unpad_rounding="floor")
    assert imported.config.select_layer == model.config.select_layer
    _assert_same_outputs(imported, model)


def _image_batch(model) -> dict:
    """One 40x90 image (a tiled grid, so vision tower, projector and newline all run) inside some text."""
    from llavakit.anyres.geometry import count_visual_tokens, grid_shape

    spec = model.config.image_spec
    rows, cols = grid_shape((40, 90), spec)
    count = count_visual_tokens((40, 90), spec)
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([[5, 6] + [model.config.image_token_id] * count + [7, 8]])
    tiles = torch.randn(1 + rows * cols, 3, spec.tile_size, spec.tile_size, generator=generator)
    return {"input_ids": ids, "pixel_values": tiles, "image_sizes": torch.tensor([[40, 90]])}


def _assert_same_outputs(converted, model) -> None:
    batch = _image_batch(model)
    with torch.no_grad():
        assert torch.equal(converted(**batch).logits, model(**batch).logits)


def test_import_takes_the_vision_tower_from_its_checkpoint_when_the_folder_has_none(preset_model, preset_parts, tmp_path):
    from safetensors.torch import load_file, save_file

    model = preset_model("debug-clip-llama")
    path = export_original(model, tmp_path / "original")
    weights = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".vision_tower." not in k}, str(path / "model.safetensors"))
    imported = import_original(path, vision=str(preset_parts("debug-clip-llama").vision_dir))
    _assert_same_outputs(imported, model)  # the preset's vision folder holds the same random tower


def test_truncated_siglip_tower_reads_its_last_remaining_layer(preset_parts, tmp_path):
    """LLaVA-NeXT deletes SigLIP's last layer and reads the new last one, whatever mm_vision_select_layer says."""
    from safetensors.torch import load_file, save_file

    from llavakit.model.llava_next import LlavaNextModel

    kwargs = preset_parts("debug-siglip-qwen2").from_parts_kwargs()
    kwargs["select_layer"] = -2
    model = LlavaNextModel.from_parts(**kwargs).eval()
    path = export_original(model, tmp_path / "original")
    last = model.vision_encoder.layers.__len__() - 1
    weights = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if f"encoder.layers.{last}." not in k}, str(path / "model.safetensors"))
    imported = import_original(path, vision=str(preset_parts("debug-siglip-qwen2").vision_dir))
    assert imported.config.select_layer == -1 and len(imported.vision_encoder.layers) == last
    _assert_same_outputs(imported, model)


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
    _assert_same_outputs(LlavaNextModel.from_pretrained(tmp_path / "back"), model)


def test_export_warns_that_the_original_layout_drops_the_system_prompt(preset_model, tmp_path, monkeypatch):
    model = preset_model("debug-clip-llama")
    monkeypatch.setattr(model.config, "system_prompt", "Answer the questions.")
    with pytest.warns(UserWarning, match="cannot record the system prompt .*'Answer the questions.'"):
        export_original(model, tmp_path / "original")


def test_export_of_a_round_unpadding_model_warns_that_upstream_truncates(preset_model, tmp_path):
    import warnings

    model = preset_model("debug-clip-llama")
    assert model.config.image_spec.uses_anyres and model.config.image_spec.unpad_rounding == "round"
    with pytest.warns(UserWarning, match=r"upstream's code truncates with int\(\)"):
        export_original(model, tmp_path / "round")
    model.config.image_spec = dataclasses.replace(model.config.image_spec, unpad_rounding="floor")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_original(model, tmp_path / "floor")
    assert not [w for w in caught if "truncates" in str(w.message)]
