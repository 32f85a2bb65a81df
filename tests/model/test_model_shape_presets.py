"""Real-shape presets: the published config values, parameter counts (on the ``meta`` device: nothing allocated),
and that a real-size vocabulary works with the small local tokenizer through the ordinary folder-loading path."""

from __future__ import annotations

import pytest
import torch
from transformers import SiglipVisionModel

from llavakit.anyres.geometry import parse_pinpoints
from llavakit.model.llava_next import LlavaNextModel
from llavakit.model.presets import PRESETS, build_parts, build_preset_in_memory, vision_config

# From the public config.json files of the checkpoints each preset copies.
QWEN25_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
}
SIGLIP_SO400M_384 = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
VICUNA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
}
CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def _meta_model(name: str, **overrides) -> LlavaNextModel:
    with torch.device("meta"):
        return build_preset_in_memory(name, **overrides)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None)
    return float(parameters["rope_theta"] if parameters else config.rope_theta)


def test_qwen_siglip_shapes_match_the_published_configs_and_sizes():
    model = _meta_model("qwen2.5-0.5b-siglip-shapes")
    text, vision = model.llm.config, model.vision_encoder.config
    assert {key: getattr(text, key) for key in QWEN25_05B} == QWEN25_05B
    assert _rope_theta(text) == 1e6
    assert {key: getattr(vision, key) for key in SIGLIP_SO400M_384} == SIGLIP_SO400M_384
    assert next(model.parameters()).device.type == "meta"
    # Qwen2.5-0.5B: 0.494B parameters (tied embeddings counted once).
    assert _count(model.llm) == pytest.approx(0.494e9, rel=1e-3)
    # SigLIP-so400m's vision tower is 0.428B with its pooling head, which LLaVA drops.
    preset = PRESETS.get("qwen2.5-0.5b-siglip-shapes")
    with_head = vision_config("siglip", 384, 14, **{**preset.vision_dims, "vision_use_head": True})
    with torch.device("meta"):
        assert _count(SiglipVisionModel(with_head)) == pytest.approx(0.428e9, rel=1e-3)
    spec = model.config.image_spec
    recipe = "[(384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152)]"
    assert spec.pinpoints == parse_pinpoints(recipe, 384, order="wh")
    assert spec.tokens_per_tile == 729
    assert (model.config.template, model.config.select_layer) == ("qwen_1_5", -2)
    assert len(model.tokenizer) < text.vocab_size


def test_vicuna_clip_slice_matches_the_published_configs_and_sizes():
    model = _meta_model("vicuna-7b-clip-l-slice")
    text, vision = model.llm.config, model.vision_encoder.config
    assert {key: getattr(text, key) for key in VICUNA_7B} == VICUNA_7B
    assert text.num_hidden_layers == 8
    assert {key: getattr(vision, key) for key in CLIP_L_336} == CLIP_L_336
    assert _count(model.vision_encoder) == pytest.approx(0.304e9, rel=2e-3)  # CLIP-L/14-336 vision tower
    # At full depth the same layers make Vicuna-7B: 6.74B parameters.
    preset = PRESETS.get("vicuna-7b-clip-l-slice")
    full = _meta_model("vicuna-7b-clip-l-slice", llm_dims={**preset.llm_dims, "num_hidden_layers": 32})
    assert _count(full.llm) == pytest.approx(6.74e9, rel=1e-3)
    spec = model.config.image_spec
    upstream = (
        "[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]"  # llava-v1.6 image_grid_pinpoints
    )
    assert set(spec.pinpoints) == set(parse_pinpoints(upstream, 336, order="wh"))
    assert spec.tokens_per_tile == 576
    assert (model.config.template, model.config.select_layer) == ("vicuna_v1", -2)


def test_real_vocabulary_with_the_small_tokenizer_loads_and_runs(tmp_path):
    """A shrunken qwen preset keeps the real 151936-token vocabulary through build_parts + from_parts (no resize)."""
    preset = PRESETS.get("qwen2.5-0.5b-siglip-shapes")
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    parts = build_parts(
        "qwen2.5-0.5b-siglip-shapes",
        tmp_path,
        tile_size=28,
        vision_dims={**preset.vision_dims, **small, "num_hidden_layers": 2},
        llm_dims={**preset.llm_dims, **small, "num_key_value_heads": 1},
    )
    model = LlavaNextModel.from_parts(**parts.from_parts_kwargs()).eval()
    assert model.llm.get_input_embeddings().weight.shape[0] == 151936
    assert model.config.image_token_id < len(model.tokenizer) < 151936
    ids = torch.tensor(
        [[1, 2, 3, *[model.config.image_token_id] * 4, 4]]
    )  # one untiled 28 px image: 2x2 patches
    output = model(
        ids,
        pixel_values=torch.randn(1, 3, 28, 28),
        image_sizes=torch.tensor([[28, 28]]),
        image_tiled=torch.tensor([False]),
    )
    assert output.logits.shape == (1, ids.shape[1], 151936)
