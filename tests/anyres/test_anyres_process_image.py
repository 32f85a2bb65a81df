"""`process_image`: pixel parity with transformers' PIL processors, tile layout, single-tile modes, bad input.

Acceptance: for AnyRes, every tile equals ``LlavaNextImageProcessorPil`` within 1e-5 (portrait, landscape, tiny,
very large, and one image per pinpoint), for CLIP-like and SigLIP-like specs. ``square``/``pad`` compare with
``CLIPImageProcessorPil`` (upstream LLaVA's processor for those modes).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from llavakit.anyres.geometry import grid_shape, select_best_resolution
from llavakit.anyres.pixels import process_image
from llavakit.errors import ImageError

TOLERANCE = 1e-5
# (height, width): portrait, landscape, tiny both ways, very large both ways, near-square, extreme strip
PARITY_SIZES = [(90, 40), (40, 90), (10, 7), (7, 10), (1000, 3000), (3000, 1000), (61, 59), (20, 300)]


def _hf_tiles(processor, image: Image.Image) -> np.ndarray:
    return processor(images=[image], return_tensors="np")["pixel_values"][0]


def _assert_close(ours: torch.Tensor, reference: np.ndarray) -> None:
    assert tuple(ours.shape) == reference.shape
    assert ours.dtype == torch.float32
    assert float(np.abs(ours.numpy() - reference).max()) < TOLERANCE


@pytest.mark.parametrize("size", PARITY_SIZES)
def test_anyres_tiles_match_transformers(size, encoder_spec, hf_image_processor, make_image):
    spec, _ = encoder_spec
    image = make_image(*size, seed=sum(size))
    _assert_close(process_image(image, spec), _hf_tiles(hf_image_processor(spec), image))


def test_anyres_tiles_are_bit_identical_to_transformers(encoder_spec, hf_image_processor, make_image):
    # stronger than the 1e-5 acceptance: same PIL resizes and the same float64-then-float32 arithmetic
    spec, _ = encoder_spec
    image = make_image(123, 77, seed=5)
    assert np.array_equal(process_image(image, spec).numpy(), _hf_tiles(hf_image_processor(spec), image))


def test_one_image_per_pinpoint_matches_transformers(encoder_spec, hf_image_processor, make_image):
    spec, _ = encoder_spec
    processor = hf_image_processor(spec)
    chosen = set()
    for index, (height, width) in enumerate(spec.pinpoints):
        # slightly smaller than the pinpoint itself, so that pinpoint is the best fit and letterboxing happens
        size = (height - 3, width - 5)
        chosen.add(select_best_resolution(size, spec.pinpoints))
        image = make_image(*size, seed=index)
        _assert_close(process_image(image, spec), _hf_tiles(processor, image))
    assert chosen == set(spec.pinpoints)


def test_bilinear_resample_option_matches_transformers(clip_spec, hf_image_processor, make_image):
    spec = dataclasses.replace(clip_spec, resample="bilinear")
    processor = hf_image_processor(spec)
    processor.resample = Image.Resampling.BILINEAR
    image = make_image(70, 45)
    _assert_close(process_image(image, spec), _hf_tiles(processor, image))


def test_tiles_are_base_then_grid_row_major(clip_spec, make_image):
    image = make_image(40, 100)
    tiles = process_image(image, clip_spec)
    rows, cols = grid_shape((40, 100), clip_spec)
    assert tiles.shape == (1 + rows * cols, 3, 32, 32)
    # the letterboxed canvas is black-padded top and bottom: first grid row starts with padding, base view doesn't
    black = process_image(Image.new("RGB", (8, 8)), dataclasses.replace(clip_spec, aspect_ratio="square"))[
        0, :, 0, 0
    ]
    assert torch.allclose(tiles[1, :, 0, 0], black)
    assert not torch.allclose(tiles[0, :, 0, 0], black)


def test_letterbox_base_view_matches_transformers_letterbox(clip_spec, hf_image_processor, make_image):
    spec = dataclasses.replace(clip_spec, base_view="letterbox")
    processor = hf_image_processor(spec)
    image = make_image(50, 20)
    chw = np.moveaxis(np.asarray(image), -1, 0)
    resized = processor._resize_for_patching(chw, (32, 32), resample=Image.Resampling.BICUBIC)
    padded = processor._pad_for_patching(resized, (32, 32))
    expected = processor.normalize(processor.rescale(padded, 1 / 255), spec.image_mean, spec.image_std)
    _assert_close(process_image(image, spec)[:1], expected[None])


def _clip_processor(spec):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": spec.tile_size},
        crop_size={"height": spec.tile_size, "width": spec.tile_size},
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
    )


def _upstream_expand2square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Upstream LLaVA ``expand2square`` (llava/mm_utils.py)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), fill)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


@pytest.mark.parametrize("size", [(90, 40), (40, 90), (33, 33), (7, 10)])
def test_square_mode_matches_clip_processor(size, encoder_spec, make_image):
    spec = dataclasses.replace(encoder_spec[0], aspect_ratio="square")
    image = make_image(*size)
    _assert_close(process_image(image, spec), _hf_tiles(_clip_processor(spec), image)[None])


@pytest.mark.parametrize("size", [(90, 40), (40, 90), (33, 33), (7, 10)])
def test_pad_mode_matches_upstream_expand2square_then_clip_processor(size, encoder_spec, make_image):
    spec = dataclasses.replace(encoder_spec[0], aspect_ratio="pad")
    image = make_image(*size)
    fill = tuple(int(m * 255) for m in spec.image_mean)
    expected = _hf_tiles(_clip_processor(spec), _upstream_expand2square(image, fill))[None]
    _assert_close(process_image(image, spec), expected)


def test_pad_mode_fills_with_the_mean_colour(clip_spec):
    spec = dataclasses.replace(clip_spec, aspect_ratio="pad")
    tile = process_image(Image.new("RGB", (40, 8), (255, 0, 0)), spec)[0]
    fill = torch.tensor([int(m * 255) / 255 for m in spec.image_mean])
    expected = (fill - torch.tensor(spec.image_mean)) / torch.tensor(spec.image_std)
    assert torch.allclose(tile[:, 0, 16], expected, atol=1e-6)  # top centre: padding, not the red strip


def test_untiled_anyres_image_uses_the_multi_image_mode(clip_spec, make_image):
    image = make_image(90, 40)
    for mode in ("pad", "square"):
        single = process_image(
            image, dataclasses.replace(clip_spec, multi_image_aspect_ratio=mode), tiled=False
        )
        assert torch.equal(single, process_image(image, dataclasses.replace(clip_spec, aspect_ratio=mode)))


def test_non_rgb_or_non_pil_input_is_rejected(clip_spec):
    with pytest.raises(ImageError, match="load_image"):
        process_image(Image.new("RGBA", (8, 8)), clip_spec)
    with pytest.raises(ImageError, match="ndarray"):
        process_image(np.zeros((8, 8, 3), dtype=np.uint8), clip_spec)
