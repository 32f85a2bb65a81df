"""Unit tests of the model's parts: vision layer selection, projectors, graph connectivity, checkpoint layout, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, LlavaNextForConditionalGeneration

from llavakit.anyres.spec import ImageSpec
from llavakit.errors import CheckpointError, ConfigError, DataError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.model.projector import (
    Projector,
    load_upstream_projector_state,
    projector_depth,
    upstream_projector_state,
)
from llavakit.model.vision import build_vision_encoder


def test_vision_encoder_returns_the_selected_hidden_state(preset_model):
    for name, drops_cls in (("debug-clip-llama", True), ("debug-siglip-qwen2", False)):
        encoder = preset_model(name).vision_encoder
        tiles = torch.randn(3, 3, encoder.image_size, encoder.image_size)
        with torch.no_grad():
            hidden = encoder.model(tiles, output_hidden_states=True).hidden_states[encoder.select_layer]
            expected = hidden[:, 1:] if drops_cls else hidden
            assert torch.allclose(encoder(tiles), expected, atol=1e-6)


def test_layers_after_the_selected_one_are_frozen_and_never_run(preset_model):
    encoder = preset_model("debug-clip-llama").vision_encoder
    assert encoder.num_layers_run == len(encoder.layers) - 1
    unused = encoder.unused_parameter_names()
    assert unused and all(not dict(encoder.named_parameters())[n].requires_grad for n in unused)
    assert any(".post_layernorm." in n for n in unused)
    assert any(f"layers.{len(encoder.layers) - 1}." in n for n in unused)


def test_select_layer_out_of_range_is_a_config_error(preset_model):
    encoder = preset_model("debug-clip-llama").vision_encoder
    with pytest.raises(ConfigError, match="out of range"):
        build_vision_encoder("clip", encoder.model, select_layer=-7)
    with pytest.raises(ConfigError, match="unknown vision encoder 'dino'.*clip, siglip"):
        build_vision_encoder("dino", encoder.model, select_layer=-2)


@pytest.mark.parametrize(("projector_id", "depth"), [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3), ("identity", 0)])
def test_projector_registry(projector_id, depth):
    width = 8 if projector_id == "identity" else 16
    projector = Projector(projector_id, 8, width)
    assert projector_depth(projector_id) == depth
    assert projector(torch.randn(2, 5, 8)).shape == (2, 5, width)
    assert sorted(k for k in projector.state_dict() if k.endswith("weight")) == [f"linear_{i}.weight" for i in range(1, depth + 1)]


def test_bad_projector_ids_are_config_errors():
    with pytest.raises(ConfigError, match="unknown projector 'mlp2x_relu'"):
        Projector("mlp2x_relu", 8, 8)
    with pytest.raises(ConfigError, match="identity"):
        Projector("identity", 8, 16)


def test_upstream_projector_file_round_trip_and_shape_check(tmp_path):
    source = Projector("mlp2x_gelu", 8, 16)
    torch.save(upstream_projector_state(source), tmp_path / "mm_projector.bin")
    assert sorted(upstream_projector_state(source)) == [
        "model.mm_projector.0.bias", "model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.mm_projector.2.weight"
    ]
    target = Projector("mlp2x_gelu", 8, 16)
    load_upstream_projector_state(target, tmp_path / "mm_projector.bin")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(CheckpointError, match="different vision encoder or LLM size"):
        load_upstream_projector_state(Projector("mlp2x_gelu", 8, 32), tmp_path / "mm_projector.bin")
    with pytest.raises(CheckpointError, match="missing"):
        load_upstream_projector_state(Projector("mlp3x_gelu", 8, 16), tmp_path / "mm_projector.bin")


def _text_batch(model, length=6):
    ids = torch.randint(5, 50, (2, length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_text_only_training_batch_keeps_every_trainable_parameter_in_the_graph(preset_model):
    for name in ("debug-clip-llama", "debug-siglip-qwen2"):
        model = preset_model(name).train()
        model(**_text_batch(model)).loss.backward()
        without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert without_grad == [], without_grad
        assert model.projector.linear_1.weight.grad.abs().sum() == 0


def test_placeholder_and_image_count_mismatches_are_data_errors(preset_model):
    model = preset_model("debug-clip-llama")
    spec = model.config.image_spec
    tiles = torch.randn(3, 3, spec.tile_size, spec.tile_size)  # a 32x64 image: base + 1x2 grid
    ids = torch.full((1, 10), model.config.image_token_id)
    with pytest.raises(DataError, match="10 <image> tokens but its images yield"):
        model(input_ids=ids, pixel_values=tiles, image_sizes=torch.tensor([[32, 64]]))
    with pytest.raises(DataError, match="implies? 5 tiles|imply 5 tiles"):
        model(input_ids=ids, pixel_values=tiles, image_sizes=torch.tensor([[64, 64]]))
    with pytest.raises(DataError, match="no pixel_values"):
        model(input_ids=ids)


def test_spec_must_match_the_encoder(preset_parts):
    kwargs = preset_parts("debug-clip-llama").from_parts_kwargs()
    kwargs["image_spec"] = ImageSpec(tile_size=64, patch_size=8, pinpoints=((64, 128),))
    with pytest.raises(ConfigError, match="tile 64/patch 8"):
        LlavaNextModel.from_parts(**kwargs)


def test_on_disk_layout_is_the_llava_hf_one(preset_model, tmp_path):
    model = preset_model("debug-siglip-qwen2")
    path = model.save_pretrained(tmp_path / "ckpt")
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    vision = [k for k in keys if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    assert "language_model.lm_head.weight" in keys, "tied heads must still be written"
    assert {"image_newline", "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias"} <= keys
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["llavakit"]["template"] == "qwen_2"


def test_tied_embeddings_survive_both_loaders(preset_model, tmp_path):
    model = preset_model("debug-siglip-qwen2")
    assert model.config.tie_word_embeddings
    path = model.save_pretrained(tmp_path / "ckpt")
    ours = LlavaNextModel.from_pretrained(path)
    assert ours.llm.lm_head.weight.data_ptr() == ours.llm.get_input_embeddings().weight.data_ptr()
    theirs = LlavaNextForConditionalGeneration.from_pretrained(path)
    assert torch.equal(theirs.lm_head.weight, model.llm.lm_head.weight)


def test_settings_transformers_cannot_reproduce_are_refused_by_transformers(preset_parts, tmp_path):
    kwargs = preset_parts("debug-clip-llama").from_parts_kwargs()
    kwargs["image_spec"] = ImageSpec(**{**kwargs["image_spec"].to_dict(), "merge_type": "flat"})
    kwargs["projector"] = "linear"
    model = LlavaNextModel.from_parts(**kwargs).eval()
    assert model.image_newline is None
    path = model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((path / "config.json").read_text())["model_type"] == "llavakit"
    with pytest.raises(ValueError, match="llavakit"):
        AutoModelForImageTextToText.from_pretrained(path)
    loaded = LlavaNextModel.from_pretrained(path)
    batch = _text_batch(model)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_broken_checkpoints_fail_with_checkpoint_errors(preset_model, tmp_path):
    path = preset_model("debug-clip-llama").save_pretrained(tmp_path / "ckpt")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        LlavaNextModel.from_pretrained(path)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        LlavaNextModel.from_pretrained(tmp_path / "nowhere")


def test_shard_units_are_decoder_and_vision_layers(preset_model):
    model = preset_model("debug-clip-llama")
    units = model.shard_units()
    assert len(units) == len(model.llm.model.layers) + len(model.vision_encoder.layers)


def test_bf16_keeps_rope_frequencies_in_fp32(preset_parts, preset_model, tmp_path):
    kwargs = preset_parts("debug-clip-llama").from_parts_kwargs()
    built = LlavaNextModel.from_parts(**kwargs, dtype=torch.bfloat16)
    path = preset_model("debug-clip-llama").save_pretrained(tmp_path / "ckpt")
    loaded = LlavaNextModel.from_pretrained(path, dtype=torch.bfloat16)
    for model in (built, loaded):
        assert model.projector.linear_1.weight.dtype == torch.bfloat16
        buffers = {n: b.dtype for n, b in model.named_buffers() if n.endswith("inv_freq")}
        assert buffers and set(buffers.values()) == {torch.float32}, buffers


def test_saving_again_removes_stale_weight_files(preset_model, tmp_path):
    first, second = preset_model("debug-clip-llama", seed=1), preset_model("debug-clip-llama", seed=2)
    first.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    second.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("model*.safetensors")) == ["model.safetensors"]
    loaded = LlavaNextModel.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.projector.linear_1.weight, second.projector.linear_1.weight)


def test_sharded_checkpoints_load_in_both_loaders(preset_model, tmp_path):
    model = preset_model("debug-clip-llama")
    path = model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    assert len(list(path.glob("model-*.safetensors"))) > 1
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.equal(LlavaNextModel.from_pretrained(path)(input_ids=ids).logits, expected)
        assert torch.allclose(LlavaNextForConditionalGeneration.from_pretrained(path)(input_ids=ids).logits, expected)


def test_saved_processor_uses_the_spec_resample_filter(preset_parts, tmp_path):
    from dataclasses import replace

    from transformers import AutoProcessor

    kwargs = preset_parts("debug-clip-llama").from_parts_kwargs()
    kwargs["image_spec"] = replace(kwargs["image_spec"], resample="bilinear")
    path = LlavaNextModel.from_parts(**kwargs).save_pretrained(tmp_path / "ckpt")
    assert int(AutoProcessor.from_pretrained(path).image_processor.resample) == 2  # PIL BILINEAR


@pytest.mark.parametrize("layout", ["flattened_vision", "in_memory_names"])
def test_other_transformers_key_layouts_load(layout, preset_model, tmp_path):
    from safetensors.torch import load_file, save_file

    model = preset_model("debug-clip-llama")
    path = model.save_pretrained(tmp_path / "ckpt")
    weights = load_file(str(path / "model.safetensors"))
    renames = {
        "flattened_vision": [("vision_tower.vision_model.", "vision_tower.")],
        "in_memory_names": [("vision_tower.vision_model.", "model.vision_tower."), ("language_model.model.", "model.language_model."),
                            ("language_model.lm_head.", "lm_head."), ("multi_modal_projector.", "model.multi_modal_projector."),
                            ("image_newline", "model.image_newline")],
    }[layout]

    def rename(key: str) -> str:
        for old, new in renames:
            if key.startswith(old):
                return new + key[len(old):]
        return key

    save_file({rename(k): v for k, v in weights.items()}, str(path / "model.safetensors"))
    loaded = LlavaNextModel.from_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
