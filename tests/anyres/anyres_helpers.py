"""Shared helpers for the AnyRes tests: tiny specs (fast), random images, and transformers oracles.

The oracles are transformers' own classes (``LlavaNextImageProcessorPil``, ``LlavaNextProcessor``,
``LlavaOnevisionProcessor``, the LlavaNext/LlavaOnevision modeling functions), built offline with a tiny local
tokenizer, so every parity test compares against code we did not write.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from llavakit.anyres.spec import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, ImageSpec

IMAGE_TOKEN_ID = 2


def tile_pinpoints(tile: int, grids: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """(rows, cols) tile grids → (height, width) pixel pinpoints."""
    return tuple((rows * tile, cols * tile) for rows, cols in grids)


# LLaVA-1.6's grid set (1×2, 2×1, 2×2, 3×1, 1×3) at tiny tile sizes, as (rows, cols).
NEXT_GRIDS = [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]

CLIP_SPEC = ImageSpec(
    tile_size=32, patch_size=8, pinpoints=tile_pinpoints(32, NEXT_GRIDS), image_mean=CLIP_MEAN, image_std=CLIP_STD
)
SIGLIP_SPEC = ImageSpec(
    tile_size=64,
    patch_size=16,
    pinpoints=tile_pinpoints(64, NEXT_GRIDS),
    image_mean=SIGLIP_MEAN,
    image_std=SIGLIP_STD,
)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A noisy RGB image with a smooth gradient (so resampling filters matter) of the given size."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    gradient = np.stack([255 * ys / max(height - 1, 1), 255 * xs / max(width - 1, 1), 128 + 0 * xs], axis=-1)
    noise = rng.integers(-40, 41, size=(height, width, 3))
    return Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8), "RGB")


def build_tiny_tokenizer():
    """A word-level tokenizer with ``<image>`` as a special token (id 2), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1, "<image>": IMAGE_TOKEN_ID}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<image>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def hf_image_processor(spec: ImageSpec):
    """transformers' PIL LLaVA-NeXT image processor configured like ``spec``."""
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    size = spec.tile_size
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=[list(p) for p in spec.pinpoints],
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
    )


def hf_next_processor(spec: ImageSpec, tokenizer, with_cls: bool):
    """``LlavaNextProcessor`` for ``spec``: CLIP-like (CLS dropped, strategy "default") or SigLIP-like ("full")."""
    from transformers.models.llava_next import LlavaNextProcessor

    return LlavaNextProcessor(
        image_processor=hf_image_processor(spec),
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default" if with_cls else "full",
        num_additional_image_tokens=1 if with_cls else 0,
    )
