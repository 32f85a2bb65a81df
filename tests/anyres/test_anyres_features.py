"""`merge_image_features`: parity with transformers' LlavaNext / LlavaOnevision ``pack_image_features`` on random
features, length == `count_visual_tokens` for every merge type over many sizes, layout checks, and bad input."""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch

from llavakit.anyres.features import merge_image_features
from llavakit.anyres.geometry import count_visual_tokens, grid_shape
from llavakit.anyres.spec import ImageSpec
from llavakit.errors import ConfigError

HIDDEN = 8


def _sizes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    extremes = [(7, 10), (10, 7), (2, 3000), (3000, 2), (1000, 3000), (33, 31), (64, 64)]
    return [(rng.randint(2, 2500), rng.randint(2, 2500)) for _ in range(n)] + extremes


def _tile_features(spec: ImageSpec, size: tuple[int, int], tiled: bool = True, seed: int = 0) -> torch.Tensor:
    n_tiles = 1 + grid_shape(size, spec)[0] * grid_shape(size, spec)[1] if tiled and spec.uses_anyres else 1
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_tiles, spec.tokens_per_tile, HIDDEN, generator=generator)


def _fake_model(spec: ImageSpec) -> SimpleNamespace:
    """Just the config attributes transformers' ``pack_image_features`` reads (no weights needed)."""
    vision = SimpleNamespace(image_size=spec.tile_size, patch_size=spec.patch_size)
    return SimpleNamespace(
        config=SimpleNamespace(vision_config=vision, image_grid_pinpoints=[list(p) for p in spec.pinpoints])
    )


@pytest.fixture(scope="module")
def onevision_spec(siglip_spec, tile_pinpoints) -> ImageSpec:
    grids = [(rows, cols) for rows in range(1, 5) for cols in range(1, 5)]
    return dataclasses.replace(siglip_spec, aspect_ratio="anyres_max_2", pinpoints=tile_pinpoints(64, grids))


def test_spatial_unpad_matches_llava_next_pack_image_features(encoder_spec):
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    spec, _ = encoder_spec
    model, newline = _fake_model(spec), torch.randn(HIDDEN)
    for index, size in enumerate(_sizes(60, seed=1)):
        features = _tile_features(spec, size, seed=index)
        (expected,), _ = LlavaNextModel.pack_image_features(
            model, [features], torch.tensor([size]), "full", newline
        )
        assert torch.equal(merge_image_features(features, size, spec, newline), expected), size


def test_single_tile_matches_llava_next_pack_image_features(clip_spec):
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    features, newline = _tile_features(clip_spec, (50, 20), tiled=False), torch.randn(HIDDEN)
    (expected,), _ = LlavaNextModel.pack_image_features(
        _fake_model(clip_spec), [features], torch.tensor([[50, 20]]), "full", newline
    )
    assert torch.equal(merge_image_features(features, (50, 20), clip_spec, newline, tiled=False), expected)


def test_anyres_max_matches_llava_onevision_pack_image_features(onevision_spec):
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    model, newline = _fake_model(onevision_spec), torch.randn(HIDDEN)
    downsampled = 0
    for index, size in enumerate(_sizes(60, seed=2)):
        features = _tile_features(onevision_spec, size, seed=index)
        (expected,), _ = LlavaOnevisionModel.pack_image_features(
            model, [features], torch.tensor([size]), newline, vision_aspect_ratio=onevision_spec.aspect_ratio
        )
        merged = merge_image_features(features, size, onevision_spec, newline)
        assert torch.equal(merged, expected), size
        downsampled += merged.shape[0] < count_visual_tokens(
            size, dataclasses.replace(onevision_spec, aspect_ratio="anyres")
        )
    assert downsampled > 10  # the bilinear branch really ran


@pytest.mark.parametrize("merge_type", ["flat", "spatial", "spatial_unpad"])
@pytest.mark.parametrize("tiled", [True, False])
def test_length_always_equals_count_visual_tokens(merge_type, tiled, clip_spec, onevision_spec):
    specs = [dataclasses.replace(clip_spec, merge_type=merge_type)]
    if merge_type == "spatial_unpad":
        specs += [onevision_spec, dataclasses.replace(clip_spec, unpad_rounding="floor")]
    for spec in specs:
        newline = torch.zeros(HIDDEN) if merge_type == "spatial_unpad" else None
        for size in _sizes(150, seed=3):
            merged = merge_image_features(_tile_features(spec, size, tiled), size, spec, newline, tiled=tiled)
            assert merged.shape == (count_visual_tokens(size, spec, tiled=tiled), HIDDEN), (spec, size)


def test_flat_concatenates_tiles_in_order(clip_spec):
    spec = dataclasses.replace(clip_spec, merge_type="flat")
    features = _tile_features(spec, (40, 100))
    assert torch.equal(merge_image_features(features, (40, 100), spec, None), features.reshape(-1, HIDDEN))


def test_spatial_reads_the_stitched_map_in_raster_order(clip_spec):
    spec = dataclasses.replace(clip_spec, merge_type="spatial")
    size = (40, 100)
    rows, cols = grid_shape(size, spec)
    side = spec.grid_side
    # label every grid token with its (y, x) position in the stitched map, built tile by tile
    full_map = torch.arange(rows * side * cols * side, dtype=torch.float32).reshape(rows * side, cols * side)
    tiles = [
        full_map[r * side : (r + 1) * side, c * side : (c + 1) * side].reshape(-1)
        for r in range(rows)
        for c in range(cols)
    ]
    features = torch.stack([torch.full((side * side,), -1.0), *tiles])[..., None].expand(-1, -1, HIDDEN)
    merged = merge_image_features(features, size, spec, None)
    assert torch.equal(merged[: side * side, 0], torch.full((side * side,), -1.0))  # base first
    assert torch.equal(merged[side * side :, 0], full_map.reshape(-1))


def test_newline_ends_every_row_and_base_comes_first(clip_spec):
    size = (64, 64)  # square image in a 2x2 grid: nothing to unpad, 8 rows of 8 + newline
    features, newline = _tile_features(clip_spec, size), torch.full((HIDDEN,), 7.0)
    merged = merge_image_features(features, size, clip_spec, newline)
    assert torch.equal(merged[:16], features[0])
    grid_rows = merged[16:].reshape(8, 9, HIDDEN)
    assert torch.equal(grid_rows[:, -1], newline.expand(8, HIDDEN))
    assert not (grid_rows[:, :-1] == 7.0).all(dim=-1).any()


def test_accepts_image_sizes_tensor_rows_and_keeps_dtype(clip_spec):
    size = torch.tensor([50, 120])
    features = _tile_features(clip_spec, (50, 120)).to(torch.bfloat16)
    merged = merge_image_features(features, size, clip_spec, torch.randn(HIDDEN))
    assert merged.dtype == torch.bfloat16 and merged.shape[0] == count_visual_tokens((50, 120), clip_spec)


def test_gradients_flow_to_features_and_newline(clip_spec):
    features = _tile_features(clip_spec, (50, 120)).requires_grad_()
    newline = torch.randn(HIDDEN, requires_grad=True)
    merge_image_features(features, (50, 120), clip_spec, newline).sum().backward()
    assert features.grad is not None and newline.grad is not None and newline.grad.abs().sum() > 0


def test_rejects_wrong_tile_count(clip_spec):
    features = _tile_features(clip_spec, (50, 120))
    with pytest.raises(ConfigError, match="needs .* tiles .* got"):
        merge_image_features(features[:-1], (50, 120), clip_spec, torch.zeros(HIDDEN))


def test_rejects_wrong_tokens_per_tile(clip_spec):
    features = _tile_features(clip_spec, (50, 120))
    with pytest.raises(ConfigError, match="17 tokens per tile .* expects 16"):
        merge_image_features(
            torch.cat([features, features[:, :1]], dim=1), (50, 120), clip_spec, torch.zeros(HIDDEN)
        )


def test_rejects_bad_rank(clip_spec):
    with pytest.raises(ConfigError, match=r"\[n_tiles, tokens, hidden\]"):
        merge_image_features(torch.zeros(16, HIDDEN), (50, 120), clip_spec, torch.zeros(HIDDEN), tiled=False)


def test_newline_is_required_exactly_for_spatial_unpad(clip_spec):
    features = _tile_features(clip_spec, (50, 120))
    with pytest.raises(ConfigError, match="pass the model's image_newline"):
        merge_image_features(features, (50, 120), clip_spec, None)
    with pytest.raises(ConfigError, match="has no newline token"):
        merge_image_features(
            features, (50, 120), dataclasses.replace(clip_spec, merge_type="flat"), torch.zeros(HIDDEN)
        )
    with pytest.raises(ConfigError, match="hidden size 8"):
        merge_image_features(features, (50, 120), clip_spec, torch.zeros(HIDDEN + 1))
