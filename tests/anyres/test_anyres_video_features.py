"""Frame pooling and video-token layouts against hand-built expectations, for every pool mode and newline position.

Each feature vector encodes where it came from (frame, row, column), so a layout check reads off the exact order;
counts must equal `VideoSpec.count_tokens`, the number the data pipeline expands ``<video>`` to.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from llavakit.anyres.video_features import add_video_newlines, merge_video_features, pool_frame_features
from llavakit.anyres.video_spec import NEWLINE_POSITIONS, POOL_MODES, VideoSpec
from llavakit.errors import ConfigError

NEWLINE = torch.full((3,), -1.0)


def _tagged_frames(frames: int, side: int) -> torch.Tensor:
    """``[frames, side², 3]`` whose vectors are (frame, row, column)."""
    tags = [(f, r, c) for f in range(frames) for r in range(side) for c in range(side)]
    return torch.tensor(tags, dtype=torch.float32).reshape(frames, side * side, 3)


@pytest.mark.parametrize(
    ("mode", "newline", "grid_side", "stride", "frames"),
    list(itertools.product(POOL_MODES, NEWLINE_POSITIONS, (4, 5, 7), (1, 2, 3), (1, 3))),
)
def test_token_count_equals_count_tokens(mode, newline, grid_side, stride, frames):
    spec = VideoSpec(pool_mode=mode, newline=newline, pool_stride=stride)
    features = torch.randn(frames, grid_side * grid_side, 3)
    tokens = merge_video_features(features, grid_side, spec, NEWLINE)
    assert tokens.shape == (spec.count_tokens(frames, grid_side), 3)


def test_average_and_max_pool_blocks_by_hand():
    grid = torch.randn(
        2, 5, 5, 4
    )  # odd side: the last row and column are dropped (floor), as avg_pool2d does
    features = grid.reshape(2, 25, 4)
    for mode, reduce in (("average", torch.mean), ("max", torch.amax)):
        pooled = pool_frame_features(features, 5, VideoSpec(pool_mode=mode, pool_stride=2))
        assert pooled.shape == (2, 2, 2, 4)
        for f, r, c in itertools.product(range(2), range(2), range(2)):
            block = grid[f, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(4, 4)
            torch.testing.assert_close(pooled[f, r, c], reduce(block, dim=0))


def test_bilinear_halving_an_even_grid_averages_each_block():
    # align_corners=False at scale 1/2 samples exactly between the four pixels of each 2x2 block
    features = torch.randn(3, 36, 4)
    bilinear = pool_frame_features(features, 6, VideoSpec(pool_mode="bilinear", pool_stride=2))
    average = pool_frame_features(features, 6, VideoSpec(pool_mode="average", pool_stride=2))
    torch.testing.assert_close(bilinear, average)


def test_bilinear_matches_transformers_apply_pooling_on_an_odd_grid():
    from types import SimpleNamespace

    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    # transformers' pooling reads the grid side from the vision config and always halves (ceil): 27 -> 14 for SigLIP
    owner = SimpleNamespace(
        config=SimpleNamespace(vision_config=SimpleNamespace(image_size=63, patch_size=9))
    )
    features = torch.randn(2, 49, 5)
    theirs = LlavaOnevisionModel.apply_pooling(owner, features.clone())
    ours = pool_frame_features(features, 7, VideoSpec(pool_mode="bilinear", pool_stride=2))
    assert ours.shape[1] == math.ceil(7 / 2)
    torch.testing.assert_close(ours.reshape(2, -1, 5), theirs, rtol=0, atol=0)


def test_bilinear_other_strides_resize_to_ceil():
    features = torch.randn(1, 49, 2)
    pooled = pool_frame_features(features, 7, VideoSpec(pool_mode="bilinear", pool_stride=3))
    grid = features.reshape(1, 7, 7, 2).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(3, 3), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(pooled, expected)


def _expected_layout(frames: int, side: int, newline: str) -> list[tuple[float, ...]]:
    """Hand-built token order: frames in time order, rows top to bottom, newlines where ``newline`` says."""
    out: list[tuple[float, ...]] = []
    for f in range(frames):
        for r in range(side):
            out += [(f, r, c) for c in range(side)]
            if newline == "grid":
                out.append((-1.0, -1.0, -1.0))
        if newline == "frame":
            out.append((-1.0, -1.0, -1.0))
    if newline == "one_token":
        out.append((-1.0, -1.0, -1.0))
    return out


@pytest.mark.parametrize("newline", NEWLINE_POSITIONS)
def test_layout_order_by_hand(newline):
    frames, side = 3, 4
    pooled = _tagged_frames(frames, side).reshape(frames, side, side, 3)
    tokens = add_video_newlines(pooled, VideoSpec(newline=newline), NEWLINE)
    expected = _expected_layout(frames, side, newline)
    assert [tuple(t) for t in tokens.tolist()] == expected
    assert len(expected) == VideoSpec(newline=newline, pool_stride=1).count_tokens(frames, side)


def test_stride_one_keeps_every_patch_in_place():
    features = _tagged_frames(2, 3)
    for mode in POOL_MODES:
        tokens = merge_video_features(
            features, 3, VideoSpec(pool_mode=mode, pool_stride=1, newline="no_token"), None
        )
        torch.testing.assert_close(tokens, features.reshape(-1, 3))


def test_newline_keeps_the_features_dtype():
    features = torch.randn(2, 16, 3, dtype=torch.bfloat16)
    tokens = merge_video_features(features, 4, VideoSpec(newline="frame"), NEWLINE)
    assert tokens.dtype == torch.bfloat16
    assert torch.equal(tokens[4], NEWLINE.to(torch.bfloat16))


@pytest.mark.parametrize("newline", ("one_token", "frame", "grid"))
def test_missing_newline_is_refused(newline):
    with pytest.raises(ConfigError, match="image_newline"):
        merge_video_features(torch.randn(1, 16, 3), 4, VideoSpec(newline=newline), None)


def test_wrong_newline_size_is_refused():
    with pytest.raises(ConfigError, match="hidden size 3"):
        merge_video_features(torch.randn(1, 16, 3), 4, VideoSpec(), torch.zeros(5))


def test_grid_with_cls_token_is_refused():
    with pytest.raises(ConfigError, match="17"):
        merge_video_features(torch.randn(2, 17, 3), 4, VideoSpec(), NEWLINE)


def test_empty_video_is_refused():
    with pytest.raises(ConfigError, match="no frames"):
        merge_video_features(torch.randn(0, 16, 3), 4, VideoSpec(), NEWLINE)


@pytest.mark.parametrize(
    ("field", "value"),
    [("force_sample", "false"), ("frames_upbound", "32"), ("frames_upbound", True), ("pool_mode", 2),
     ("add_time_instruction", 1), ("video_fps", 1.5)],
)  # fmt: skip
def test_video_spec_fields_are_type_checked(field, value):
    with pytest.raises(ConfigError, match=rf"video_spec\.{field} must be a"):
        VideoSpec.from_dict({field: value})


def test_video_spec_refuses_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['frames'\]"):
        VideoSpec.from_dict({"frames": 8})
    with pytest.raises(ConfigError, match="force_sample needs frames_upbound > 0"):
        VideoSpec(frames_upbound=0, force_sample=True)
    assert VideoSpec.from_dict(VideoSpec(newline="grid").to_dict()) == VideoSpec(newline="grid")
