"""Fixtures for the AnyRes tests: tiny specs (fast), random images, and transformers oracles.

The oracles are transformers' own classes (``LlavaNextImageProcessorPil``, ``LlavaNextProcessor``,
``LlavaOnevisionProcessor``, the LlavaNext/LlavaOnevision modeling functions), built offline with a tiny local
tokenizer, so every parity test compares against code we did not write. Helpers are fixtures because the suite runs
with ``--import-mode=importlib`` (test modules cannot import each other).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from llavakit.anyres.spec import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, ImageSpec

# LLaVA-1.6's grid set (1×2, 2×1, 2×2, 3×1, 1×3 tiles), as (rows, cols).
NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def _tile_pinpoints(tile: int, grids) -> tuple[tuple[int, int], ...]:
    """(rows, cols) tile grids → (height, width) pixel pinpoints."""
    return tuple((rows * tile, cols * tile) for rows, cols in grids)


def _random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A noisy RGB gradient of the given size (noise and edges make resampling differences visible)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    gradient = np.stack([255 * ys / max(height - 1, 1), 255 * xs / max(width - 1, 1), 128 + 0 * xs], axis=-1)
    noise = rng.integers(-40, 41, size=(height, width, 3))
    return Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="session")
def tile_pinpoints() -> Callable:
    """``tile_pinpoints(tile, [(rows, cols), ...])`` → pixel pinpoints."""
    return _tile_pinpoints


@pytest.fixture(scope="session")
def clip_spec() -> ImageSpec:
    """CLIP-like spec (CLIP mean/std) at tile 32 / patch 8: 4×4 tokens per tile."""
    return ImageSpec(
        tile_size=32,
        patch_size=8,
        pinpoints=_tile_pinpoints(32, NEXT_GRIDS),
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


@pytest.fixture(scope="session")
def siglip_spec() -> ImageSpec:
    """SigLIP-like spec (0.5/0.5) at tile 64 / patch 16: 4×4 tokens per tile."""
    return ImageSpec(
        tile_size=64,
        patch_size=16,
        pinpoints=_tile_pinpoints(64, NEXT_GRIDS),
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
    )


@pytest.fixture(params=["clip", "siglip"])
def encoder_spec(request, clip_spec, siglip_spec) -> tuple[ImageSpec, bool]:
    """(spec, has_cls) for a CLIP-like (CLS token dropped) and a SigLIP-like (no CLS) encoder."""
    return (clip_spec, True) if request.param == "clip" else (siglip_spec, False)


@pytest.fixture(scope="session")
def make_image() -> Callable[..., Image.Image]:
    """``make_image(height, width, seed=0)`` → a random RGB PIL image."""
    return _random_image


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer with ``<image>`` as a special token, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1, "<image>": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<image>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.fixture(scope="session")
def hf_image_processor() -> Callable:
    """``hf_image_processor(spec)`` → transformers' ``LlavaNextImageProcessorPil`` configured like ``spec``."""
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    def build(spec: ImageSpec):
        return LlavaNextImageProcessorPil(
            size={"shortest_edge": spec.tile_size},
            crop_size={"height": spec.tile_size, "width": spec.tile_size},
            image_grid_pinpoints=[list(p) for p in spec.pinpoints],
            image_mean=list(spec.image_mean),
            image_std=list(spec.image_std),
        )

    return build


@pytest.fixture(scope="session")
def hf_next_processor(hf_image_processor, tiny_tokenizer) -> Callable:
    """``hf_next_processor(spec, has_cls)`` → ``LlavaNextProcessor`` (strategy "default" with CLS, else "full")."""
    from transformers.models.llava_next import LlavaNextProcessor

    def build(spec: ImageSpec, has_cls: bool):
        return LlavaNextProcessor(
            image_processor=hf_image_processor(spec),
            tokenizer=tiny_tokenizer,
            patch_size=spec.patch_size,
            vision_feature_select_strategy="default" if has_cls else "full",
            num_additional_image_tokens=1 if has_cls else 0,
        )

    return build
