"""Shared test setup: offline Hugging Face hub, and tiny preset models built once per session.

Presets are written to folders and assembled through `LlavaNextModel.from_parts`, the same loading path users take
with hub checkpoints, so every test that uses them exercises the real loading code.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

PRESET_NAMES = ("debug-clip-llama", "debug-siglip-qwen2")


@pytest.fixture(scope="session")
def preset_parts(tmp_path_factory):
    """``preset_parts(name)`` → `PresetParts` (folders written once per session)."""
    from llavakit.model.presets import build_parts

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_parts(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture
def preset_model(preset_parts):
    """``preset_model(name)`` → a fresh `LlavaNextModel` assembled from the preset's folders (eval mode)."""
    import torch

    from llavakit.model.llava_next import LlavaNextModel

    def build(name: str, seed: int = 0):
        # The parts first: writing them (once per session) draws random numbers, which must not shift the seeded
        # projector and image_newline of the first model built.
        kwargs = preset_parts(name).from_parts_kwargs()
        torch.manual_seed(seed)
        return LlavaNextModel.from_parts(**kwargs).eval()

    return build


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A saved ``debug-clip-llama`` checkpoint folder (random weights, vicuna_v1 template, AnyRes 32 px tiles)."""
    import torch

    from llavakit.model.llava_next import LlavaNextModel
    from llavakit.model.presets import build_parts

    root = tmp_path_factory.mktemp("checkpoint")
    parts = build_parts("debug-clip-llama", root / "parts")
    torch.manual_seed(0)
    model = LlavaNextModel.from_parts(**parts.from_parts_kwargs())
    return model.save_pretrained(root / "ckpt")
