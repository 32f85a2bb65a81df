"""A tiny random checkpoint on disk (built once per module) and small synthetic images to ask about."""

from __future__ import annotations

import pytest
from PIL import Image

from llavakit.data.synth import SynthConfig, generate_synth


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved ``debug-clip-llama`` checkpoint folder (random weights, vicuna_v1 template, AnyRes 32 px tiles)."""
    import torch

    from llavakit.model.llava_next import LlavaNextModel
    from llavakit.model.presets import build_parts

    root = tmp_path_factory.mktemp("inference")
    parts = build_parts("debug-clip-llama", root / "parts")
    torch.manual_seed(0)
    model = LlavaNextModel.from_parts(**parts.from_parts_kwargs())
    return model.save_pretrained(root / "ckpt")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Paths of synthetic images of the three canvas shapes (square, wide, tall)."""
    dataset = generate_synth(tmp_path_factory.mktemp("images"), SynthConfig(n_train=12, n_heldout=2, seed=1))
    paths = sorted((dataset.root / "images" / "train").glob("*.png"))
    by_shape = {}
    for path in paths:
        with Image.open(path) as image:
            by_shape.setdefault(image.size, str(path))
    return list(by_shape.values())
