"""``anyres_max_N`` checkpoints load in transformers' LlavaOnevisionForConditionalGeneration with equal logits."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from transformers import LlavaOnevisionForConditionalGeneration

from llavakit.anyres.geometry import count_visual_tokens, grid_shape
from llavakit.anyres.pixels import process_image
from llavakit.model.llava_next import LlavaNextModel


def test_anyres_max_checkpoint_matches_llava_onevision(preset_parts, tmp_path):
    kwargs = preset_parts("debug-siglip-qwen2").from_parts_kwargs()
    kwargs["image_spec"] = replace(kwargs["image_spec"], aspect_ratio="anyres_max_2")
    torch.manual_seed(0)
    model = LlavaNextModel.from_parts(**kwargs).eval()
    path = model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((path / "config.json").read_text())["model_type"] == "llava_onevision"
    reference, info = LlavaOnevisionForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    spec = model.config.image_spec
    sizes = [(90, 95), (40, 90)]  # a 3x3 grid (downsampled: 9 tiles > 2) and a 2x3 one
    assert grid_shape(sizes[0], spec) == (3, 3)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for size in sizes]
    tiles = [process_image(image, spec) for image in images]
    counts = [count_visual_tokens(size, spec) for size in sizes]
    token = model.config.image_token_id
    input_ids = torch.tensor([[7] + [token] * counts[0] + [8] + [token] * counts[1] + [9]])
    padded = torch.zeros(2, max(t.shape[0] for t in tiles), *tiles[0].shape[1:])
    for index, image_tiles in enumerate(tiles):
        padded[index, : image_tiles.shape[0]] = image_tiles
    image_sizes = torch.tensor(sizes)
    with torch.no_grad():
        ours = model(input_ids=input_ids, pixel_values=torch.cat(tiles), image_sizes=image_sizes).logits
        theirs = reference.eval()(input_ids=input_ids, pixel_values=padded, image_sizes=image_sizes).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    loaded = LlavaNextModel.from_pretrained(path)
    assert loaded.config.image_spec.aspect_ratio == "anyres_max_2"
