"""Geometry: pinpoint parsing, best-resolution choice (with ties), grid shapes and exact token counts.

Oracles: transformers' ``select_best_resolution``, ``get_anyres_image_grid_shape``, ``LlavaNextProcessor``'s token
count and ``<image>`` expansion, ``LlavaOnevisionProcessor``'s count, and upstream LLaVA's ``int()`` unpad formula.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from llavakit.anyres.geometry import (
    count_visual_tokens,
    grid_shape,
    letterbox_size,
    parse_pinpoints,
    select_best_resolution,
)
from llavakit.anyres.spec import ImageSpec
from llavakit.errors import ConfigError, ImageError


def _random_sizes(n: int, seed: int, max_side: int = 3000) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(rng.randint(2, max_side), rng.randint(2, max_side)) for _ in range(n)]
    # extreme aspect ratios and tiny images are where off-by-one unpadding bugs live
    return sizes + [(7, 10), (10, 7), (2, 2), (2, 3000), (3000, 2), (1000, 3000), (899, 1024), (336, 336)]


# --- parse_pinpoints -------------------------------------------------------------------------------------------


def test_parse_list_of_wh_tuples_becomes_hw():
    assert parse_pinpoints([(336, 672), (672, 336)], 336) == ((672, 336), (336, 672))


def test_parse_list_of_lists_in_hw_order_is_kept():
    assert parse_pinpoints([[336, 672], [1008, 336]], 336, order="hw") == ((336, 672), (1008, 336))


def test_parse_python_literal_string():
    text = "[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]"
    assert parse_pinpoints(text, 336) == ((672, 336), (336, 672), (672, 672), (336, 1008), (1008, 336))


def test_parse_range_form_expands_first_to_last_like_upstream():
    # upstream keeps only the first and last (AxB): the middle item is ignored
    parsed = parse_pinpoints("(1x1),(5x5),(2x3)", 384)
    expected_wh = [(i * 384, j * 384) for i in range(1, 3) for j in range(1, 4)]
    assert parsed == tuple((h, w) for w, h in expected_wh)


def test_parse_onevision_range_has_36_candidates_up_to_2304():
    parsed = parse_pinpoints("(1x1),...,(6x6)", 384)
    assert len(parsed) == 36 and max(parsed) == (2304, 2304) and min(parsed) == (384, 384)


def test_parse_range_form_respects_hw_order():
    assert parse_pinpoints("(1x2),...,(1x3)", 10, order="hw") == ((10, 20), (10, 30))
    assert parse_pinpoints("(1x2),...,(1x3)", 10, order="wh") == ((20, 10), (30, 10))


@pytest.mark.parametrize(
    "value, fragment",
    [
        ([(336, 500)], "not a positive multiple of the tile size 336"),
        ([], "empty"),
        ("[]", "empty"),
        ("[(336, 672)", "cannot parse"),
        ("[(336,)]", "not a pair of integers"),
        ([(336, 672.0)], "not a pair of integers"),
        ([(True, 336)], "not a pair of integers"),
        ("(3x3),...,(1x1)", "small to large"),
        ("(0x1),...,(2x2)", "small to large"),
        ("1x2", "no '\\(AxB\\)' item"),
        ("336", "not a list"),
        (336, "must be a list or a string"),
        ([(-336, 336)], "not a positive multiple"),
    ],
)
def test_parse_rejects_bad_pinpoints_with_a_fix(value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_pinpoints(value, 336)


def test_parse_error_says_what_to_write_instead():
    with pytest.raises(ConfigError, match=r"\(1x1\),\.\.\.,\(3x3\)"):
        parse_pinpoints([(336, 500)], 336)


def test_parse_rejects_unknown_order():
    with pytest.raises(ConfigError, match="'wh'"):
        parse_pinpoints([(336, 336)], 336, order="xy")


# --- select_best_resolution ------------------------------------------------------------------------------------


def test_select_best_resolution_matches_transformers_on_random_sizes(clip_spec):
    from transformers.image_processing_utils import select_best_resolution as hf_select

    pinpoint_sets = [clip_spec.pinpoints, ImageSpec().pinpoints, parse_pinpoints("(1x1),...,(6x6)", 384)]
    for pinpoints in pinpoint_sets:
        for size in _random_sizes(150, seed=len(pinpoints)):
            assert select_best_resolution(size, pinpoints) == tuple(
                hf_select(size, [list(p) for p in pinpoints])
            )


def test_full_tie_keeps_the_first_listed_pinpoint():
    # a small square image fits 1x2 and 2x1 equally (same effective pixels, same waste)
    assert select_best_resolution((20, 20), [(32, 64), (64, 32)]) == (32, 64)
    assert select_best_resolution((20, 20), [(64, 32), (32, 64)]) == (64, 32)


def test_effective_tie_is_broken_by_least_waste():
    # every candidate holds all 10x7 pixels; the smallest canvas wastes least, wherever it is listed
    assert select_best_resolution((10, 7), [(128, 128), (64, 128), (32, 32), (64, 64)]) == (32, 32)


def test_more_effective_pixels_beat_less_waste():
    # 600x1000 keeps more pixels on the larger canvas even though it wastes more
    assert select_best_resolution((600, 1000), [(336, 672), (672, 1008)]) == (672, 1008)


def test_select_best_resolution_rejects_empty_and_bad_sizes():
    with pytest.raises(ConfigError, match="at least one pinpoint"):
        select_best_resolution((10, 10), [])
    with pytest.raises(ImageError, match="positive integers"):
        select_best_resolution((0, 10), [(32, 32)])


# --- grid_shape / letterbox_size ---------------------------------------------------------------------------------


def test_grid_shape_matches_transformers(clip_spec):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    pinpoints = [list(p) for p in clip_spec.pinpoints]
    for size in _random_sizes(100, seed=3):
        assert grid_shape(size, clip_spec) == get_anyres_image_grid_shape(list(size), pinpoints, 32)


@pytest.mark.parametrize("aspect_ratio", ["pad", "square"])
def test_grid_shape_rejects_single_tile_specs(aspect_ratio, clip_spec):
    with pytest.raises(ConfigError, match="needs an anyres spec"):
        grid_shape((100, 100), dataclasses.replace(clip_spec, aspect_ratio=aspect_ratio))


def test_letterbox_size_matches_transformers():
    import numpy as np
    from transformers.image_processing_utils import get_patch_output_size
    from transformers.image_utils import ChannelDimension

    for size in _random_sizes(100, seed=4):
        for target in [(64, 64), (32, 96), (96, 32)]:
            fake = np.empty((3, *size), dtype=np.uint8)
            expected = get_patch_output_size(fake, target, input_data_format=ChannelDimension.FIRST)
            assert letterbox_size(size, target) == expected


# --- count_visual_tokens -----------------------------------------------------------------------------------------


def test_count_matches_llava_next_processor_formula(encoder_spec, hf_next_processor):
    spec, with_cls = encoder_spec
    processor = hf_next_processor(spec, with_cls)
    size = spec.tile_size
    for height, width in _random_sizes(300, seed=5):
        hf_count = processor._get_number_of_features(height, width, size, size)
        # transformers counts CLS via num_additional_image_tokens and drops it again for "default": net zero
        hf_count -= 1 if with_cls else 0
        assert count_visual_tokens((height, width), spec) == hf_count, (height, width)


def test_count_matches_processor_image_token_expansion(encoder_spec, hf_next_processor, make_image):
    spec, with_cls = encoder_spec
    processor = hf_next_processor(spec, with_cls)
    for height, width in [(50, 120), (90, 70), (7, 10), (33, 33), (200, 40), (300, 90)]:
        batch = processor(text=["hi <image>"], images=[make_image(height, width)], return_tensors="np")
        expanded = int((batch["input_ids"][0] == processor.image_token_id).sum())
        assert expanded == count_visual_tokens((height, width), spec)


def test_count_reproduces_published_llava_16_budgets():
    spec = ImageSpec()  # CLIP-336 defaults
    assert count_visual_tokens((672, 672), spec) == 576 + 48 * 48 + 48
    assert count_visual_tokens((1008, 336), spec) == 576 + 72 * 24 + 72


def _onevision_count(spec: ImageSpec, size: tuple[int, int]) -> int:
    """transformers' LlavaOnevisionProcessor count; built without __init__ because its video processor needs
    torchvision, which this environment must not install."""
    from types import SimpleNamespace

    from transformers.models.llava_onevision import LlavaOnevisionProcessor

    processor = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    processor.image_processor = SimpleNamespace(image_grid_pinpoints=[list(p) for p in spec.pinpoints])
    processor.num_image_tokens = spec.grid_side**2
    processor.vision_aspect_ratio = spec.aspect_ratio
    return processor._get_number_of_features(size[0], size[1], spec.tile_size, spec.tile_size)


@pytest.mark.parametrize("max_tiles", [1, 2, 4])
def test_count_matches_onevision_for_anyres_max(max_tiles, siglip_spec, tile_pinpoints):
    spec = dataclasses.replace(
        siglip_spec,
        aspect_ratio=f"anyres_max_{max_tiles}",
        pinpoints=tile_pinpoints(64, [(r, c) for r in range(1, 5) for c in range(1, 5)]),
    )
    downsampled = 0
    for size in _random_sizes(200, seed=max_tiles):
        count = count_visual_tokens(size, spec)
        assert count == _onevision_count(spec, size), size
        downsampled += count < count_visual_tokens(size, dataclasses.replace(spec, aspect_ratio="anyres"))
    assert downsampled > 20  # the test exercises the downsampling branch, not only the pass-through


def test_count_matches_onevision_with_the_real_siglip_384_14_config():
    # 384 px tiles, 14 px patches (27x27 = 729 tokens), 6x6 range of pinpoints, anyres_max_9: LLaVA-OneVision
    spec = ImageSpec(
        tile_size=384,
        patch_size=14,
        aspect_ratio="anyres_max_9",
        pinpoints=parse_pinpoints("(1x1),...,(6x6)", 384),
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    )
    assert spec.tokens_per_tile == 729
    for size in _random_sizes(300, seed=11, max_side=5000):
        assert count_visual_tokens(size, spec) == _onevision_count(spec, size), size


def _upstream_floor_unpad(image_hw, rows, cols, g):
    """Upstream LLaVA ``unpad_image`` (llava/model/llava_arch.py) shape arithmetic, with its ``int()``."""
    original_height, original_width = image_hw
    current_height, current_width = rows * g, cols * g
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return current_height - 2 * padding, current_width
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return current_height, current_width - 2 * padding


def test_floor_rounding_follows_upstream_and_differs_from_round_somewhere():
    spec = ImageSpec(unpad_rounding="floor")
    differs = 0
    for size in _random_sizes(2000, seed=6, max_side=2000):
        rows, cols = grid_shape(size, spec)
        height, width = _upstream_floor_unpad(size, rows, cols, spec.grid_side)
        assert count_visual_tokens(size, spec) == spec.tokens_per_tile + height * (width + 1)
        differs += count_visual_tokens(size, spec) != count_visual_tokens(size, ImageSpec())
    assert differs > 0


@pytest.mark.parametrize("merge_type", ["flat", "spatial"])
def test_flat_and_spatial_count_every_tile_token(merge_type, clip_spec):
    spec = dataclasses.replace(clip_spec, merge_type=merge_type)
    rows, cols = grid_shape((40, 100), spec)
    assert count_visual_tokens((40, 100), spec) == (1 + rows * cols) * 16


def test_cls_patch_counts_the_cls_token_of_every_tile(clip_spec):
    spec = dataclasses.replace(clip_spec, merge_type="flat", select_feature="cls_patch")
    rows, cols = grid_shape((40, 100), spec)
    assert count_visual_tokens((40, 100), spec) == (1 + rows * cols) * 17


@pytest.mark.parametrize(
    "aspect_ratio, merge_type, tiled, expected",
    [
        ("anyres", "spatial_unpad", False, 16 + 1),
        ("anyres_max_4", "spatial_unpad", False, 16 + 1),
        ("pad", "spatial_unpad", True, 16 + 1),
        ("pad", "flat", True, 16),
        ("square", "spatial", True, 16),
        ("anyres", "flat", False, 16),
    ],
)
def test_single_tile_counts(aspect_ratio, merge_type, tiled, expected, clip_spec):
    spec = dataclasses.replace(clip_spec, aspect_ratio=aspect_ratio, merge_type=merge_type)
    assert count_visual_tokens((123, 45), spec, tiled=tiled) == expected


def test_count_rejects_bad_sizes(clip_spec):
    for bad in [(0, 10), (10, -1), (10,), (1.5, 10)]:
        with pytest.raises(ImageError, match="positive integers"):
            count_visual_tokens(bad, clip_spec)
