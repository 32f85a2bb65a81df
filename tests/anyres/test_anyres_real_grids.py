"""`process_image` is bit-identical to transformers' ``LlavaNextImageProcessorPil`` on the real CLIP-336 and
SigLIP-384 ``anyres_max_9`` grids (``(1x1),...,(6x6)``).

The oracle is transformers' own processor (and its ``rescale``), never our arithmetic: tiles must be equal float32
arrays, not merely close, for varied sizes and aspect ratios, tiny and extreme-aspect images, and RGBA, grayscale
and palette inputs (decoded by `load_image`, given to transformers as the original image).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llavakit.anyres.geometry import grid_shape, parse_pinpoints
from llavakit.anyres.pixels import load_image, process_image
from llavakit.anyres.spec import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, ImageSpec

# (height, width): COCO-like 4:3 both ways, a large 12-tile canvas, tiny, extreme strips, odd sizes
SIZES = [(480, 640), (640, 480), (900, 1300), (5, 9), (12, 1500), (1500, 12), (333, 777)]


def _max_9(tile: int, mean, std) -> ImageSpec:
    return ImageSpec(
        tile_size=tile,
        patch_size=14,
        aspect_ratio="anyres_max_9",
        pinpoints=parse_pinpoints("(1x1),...,(6x6)", tile),
        image_mean=mean,
        image_std=std,
    )


@pytest.fixture(scope="module", params=["clip336", "siglip384"])
def real_spec(request) -> ImageSpec:
    if request.param == "clip336":
        return _max_9(336, CLIP_MEAN, CLIP_STD)
    return _max_9(384, SIGLIP_MEAN, SIGLIP_STD)


def _reference(hf_image_processor, spec: ImageSpec, image: Image.Image) -> np.ndarray:
    return hf_image_processor(spec)(images=[image], return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize("size", SIZES)
def test_anyres_max_9_tiles_are_bit_identical(size, real_spec, hf_image_processor, make_image):
    image = make_image(*size, seed=size[0] * 7 + size[1])
    ours = process_image(image, real_spec)
    rows, cols = grid_shape(size, real_spec)
    assert tuple(ours.shape) == (1 + rows * cols, 3, real_spec.tile_size, real_spec.tile_size)
    assert np.array_equal(ours.numpy(), _reference(hf_image_processor, real_spec, image))


def _rgba(make_image) -> Image.Image:
    image = make_image(300, 500, seed=3).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 500, dtype=np.uint8), (300, 1))
    image.putalpha(Image.fromarray(alpha, "L"))
    return image


def _palette(make_image) -> Image.Image:
    return make_image(410, 290, seed=4).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)


@pytest.mark.parametrize("kind", ["rgba", "grayscale", "palette"])
def test_non_rgb_inputs_are_bit_identical_after_load_image(kind, real_spec, hf_image_processor, make_image):
    source = {
        "rgba": lambda: _rgba(make_image),
        "grayscale": lambda: make_image(520, 350, seed=5).convert("L"),
        "palette": lambda: _palette(make_image),
    }[kind]()
    ours = process_image(load_image(source), real_spec)
    assert np.array_equal(ours.numpy(), _reference(hf_image_processor, real_spec, source))


def test_letterbox_base_view_pads_like_the_grid(make_image):
    # base_view="letterbox" goes through the same canvas path: its padding rows hold the normalised black value
    spec = _max_9(336, CLIP_MEAN, CLIP_STD)
    letterbox = ImageSpec(**{**spec.to_dict(), "base_view": "letterbox", "pinpoints": spec.pinpoints})
    tiles = process_image(make_image(100, 400, seed=1), letterbox)
    black = (0.0 - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    assert np.array_equal(tiles[0, :, 0, 0].numpy(), black.astype(np.float32))
    assert not np.array_equal(tiles[0, :, 168, 0].numpy(), black.astype(np.float32))
