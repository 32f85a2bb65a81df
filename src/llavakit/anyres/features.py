"""Tile features → the visual-token sequence of one image (stitch, unpad, newline, ``anyres_max_N`` downsample).

The vision encoder and projector see tiles independently; this module puts them back together in the order the LLM
was trained on. Output lengths come from the same shape helpers as `llavakit.anyres.geometry.count_visual_tokens`,
so the number of ``<image>`` tokens in the text always equals the number of features (tested over many sizes).

Merge types (``ImageSpec.merge_type``), all with the base view's tokens first:

- ``flat``: every tile's tokens concatenated in tile order.
- ``spatial``: grid tiles stitched into one ``(rows*g, cols*g)`` map and read in raster order, no newline. This is
  upstream's ``permute(0, 2, 1, 3, 4).flatten(0, 3)``, which interleaves tiles row by row of the stitched map; a
  tile's tokens are therefore contiguous only within one feature row.
- ``spatial_unpad``: stitched map, letterbox padding removed (``ImageSpec.unpad_rounding``: transformers ``round``
  or upstream ``floor``, which keeps two rows or columns fewer on rare sizes), then ``anyres_max_N`` bilinear downsampling (``align_corners=False``, floor-divided size,
  as upstream and transformers' LlavaOnevision), then the ``newline`` vector appended after every row.

A single-tile image (``tiled=False`` or a ``square``/``pad`` spec) yields its tile's tokens, plus one trailing
``newline`` under ``spatial_unpad`` (upstream does the same for pad-mode and multi-image inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from llavakit.anyres.geometry import downsampled_shape, grid_shape, unpadded_shape
from llavakit.anyres.spec import ImageSpec
from llavakit.errors import ConfigError


def merge_image_features(
    tile_features: torch.Tensor,
    image_hw: Sequence[int] | torch.Tensor,
    spec: ImageSpec,
    newline: torch.Tensor | None,
    tiled: bool = True,
) -> torch.Tensor:
    """Merge one image's projected tile features into its visual tokens.

    Args:
        tile_features: ``[n_tiles, T, D]``, tile 0 the base view then grid tiles row-major, ``T =
            spec.tokens_per_tile``, D the LLM hidden size.
        image_hw: original (height, width) of the image (a pair or a 2-element tensor row of ``image_sizes``).
        spec: the preprocessing spec the tiles were made with.
        newline: ``[D]`` learned row-end vector; required by ``spatial_unpad``, must be None otherwise.
        tiled: False when the image was preprocessed as a single tile.

    Returns:
        ``[count_visual_tokens(image_hw, spec, tiled), D]`` in ``tile_features``' dtype and device.
    """
    size = tuple(int(x) for x in image_hw)
    _check_newline(newline, spec, tile_features)
    if not (tiled and spec.uses_anyres):
        _check_tiles(tile_features, 1, spec, size)
        tokens = tile_features[0]
        return _append_newline(tokens, newline) if spec.merge_type == "spatial_unpad" else tokens
    rows, cols = grid_shape(size, spec)
    _check_tiles(tile_features, 1 + rows * cols, spec, size)
    if spec.merge_type == "flat":
        return tile_features.reshape(-1, tile_features.shape[-1])
    base = tile_features[0]
    feature_map = stitch_tiles(tile_features[1:], rows, cols)
    if spec.merge_type == "spatial":
        return torch.cat([base, feature_map.flatten(1).T])
    feature_map = unpad_feature_map(feature_map, size, spec.unpad_rounding)
    feature_map = downsample_feature_map(feature_map, spec)
    assert newline is not None  # guaranteed by _check_newline for spatial_unpad
    rows_with_newline = torch.cat([feature_map, _newline_column(newline, feature_map)], dim=2)
    return torch.cat([base, rows_with_newline.flatten(1).T])


def stitch_tiles(grid_features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Grid tiles ``[rows*cols, g*g, D]`` (row-major) → one feature map ``[D, rows*g, cols*g]``."""
    _, tokens, dim = grid_features.shape
    side = math.isqrt(tokens)
    return (
        grid_features.reshape(rows, cols, side, side, dim)
        .permute(4, 0, 2, 1, 3)
        .reshape(dim, rows * side, cols * side)
    )


def unpad_feature_map(feature_map: torch.Tensor, image_hw: tuple[int, int], rounding: str) -> torch.Tensor:
    """Drop the rows/columns that cover letterbox padding: ``[D, H, W]`` → ``[D, H', W']``.

    The same number is cut from both sides (``(H - H') // 2`` from the top), as upstream's and transformers'
    ``unpad_image`` slice ``[padding : H - padding]``; ``rounding`` as in `unpadded_shape`.
    """
    cur_h, cur_w = feature_map.shape[1:]
    kept_h, kept_w = unpadded_shape((cur_h, cur_w), image_hw, rounding)
    top, left = (cur_h - kept_h) // 2, (cur_w - kept_w) // 2
    return feature_map[:, top : top + kept_h, left : left + kept_w]


def downsample_feature_map(feature_map: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """``anyres_max_N``: bilinearly shrink ``[D, H', W']`` so grid tokens stay near N tiles' worth (else unchanged)."""
    target = downsampled_shape(tuple(feature_map.shape[1:]), spec)
    if target == tuple(feature_map.shape[1:]):
        return feature_map
    return F.interpolate(feature_map[None], size=target, mode="bilinear", align_corners=False)[0]


def _newline_column(newline: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
    """``newline [D]`` broadcast to one extra column ``[D, H', 1]`` of the map's dtype and device."""
    dim, height = feature_map.shape[:2]
    return newline.to(feature_map)[:, None, None].expand(dim, height, 1)


def _append_newline(tokens: torch.Tensor, newline: torch.Tensor | None) -> torch.Tensor:
    """``[T, D]`` → ``[T + 1, D]`` with the newline vector last."""
    assert newline is not None  # guaranteed by _check_newline for spatial_unpad
    return torch.cat([tokens, newline.to(tokens)[None]])


def _check_newline(newline: torch.Tensor | None, spec: ImageSpec, tile_features: torch.Tensor) -> None:
    """The newline vector is required exactly when the merge appends it, with the features' hidden size."""
    needs = spec.merge_type == "spatial_unpad"
    if needs and newline is None:
        raise ConfigError(
            "merge_type 'spatial_unpad' appends a learned newline vector: pass the model's image_newline"
        )
    if not needs and newline is not None:
        raise ConfigError(
            f"merge_type {spec.merge_type!r} has no newline token: pass newline=None (or use 'spatial_unpad')"
        )
    if newline is not None and newline.shape != tile_features.shape[-1:]:
        raise ConfigError(
            f"newline has shape {tuple(newline.shape)} but tile features have hidden size {tile_features.shape[-1]}"
        )


def _check_tiles(
    tile_features: torch.Tensor, expected_tiles: int, spec: ImageSpec, image_hw: tuple[int, int]
) -> None:
    """Fail with the likely cause when the feature tensor does not match the image under this spec."""
    if tile_features.dim() != 3:
        raise ConfigError(
            f"tile_features must be [n_tiles, tokens, hidden], got shape {tuple(tile_features.shape)}"
        )
    n_tiles, tokens, _ = tile_features.shape
    if tokens != spec.tokens_per_tile:
        raise ConfigError(
            f"tile features have {tokens} tokens per tile but image_spec (tile_size {spec.tile_size}, patch_size "
            f"{spec.patch_size}, select_feature {spec.select_feature!r}) expects {spec.tokens_per_tile}: make the "
            "vision encoder's image_size/patch_size and feature selection match the spec"
        )
    if n_tiles != expected_tiles:
        raise ConfigError(
            f"image of size (h={image_hw[0]}, w={image_hw[1]}) needs {expected_tiles} tiles under this spec but got "
            f"{n_tiles}: pixel_values and image_sizes/image_tiled are out of sync, or the tiles were made with "
            "a different spec"
        )
