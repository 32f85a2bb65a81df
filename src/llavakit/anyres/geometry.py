"""AnyRes geometry: pinpoints, best-resolution choice, grid shape and exact visual-token counts.

This module is pure Python (no torch, no pixels) so the data pipeline can count an image's visual tokens from its
size alone, before decoding it, and the count is guaranteed to equal what `llavakit.anyres.features` produces: both
use the shape helpers defined here (`unpadded_shape`, `downsampled_shape`).

Upstream quirks reproduced here, each as a named option:

- Pinpoint order. Upstream LLaVA-NeXT CLI/config strings list ``(width, height)`` pairs; transformers' config lists
  ``(height, width)``. `parse_pinpoints` takes ``order="wh"`` (upstream, default) or ``order="hw"`` (transformers)
  and always returns ``(height, width)``. The range form ``"(1x1),...,(6x6)"`` keeps only the first and last
  ``(AxB)`` like upstream and expands every pair in between; unlike upstream it accepts any tile size (upstream
  asserts one of 224/336/384/448/512).
- Unpad rounding (`ImageSpec.unpad_rounding`): ``"round"`` is transformers' ``int(round(x, 7))``, ``"floor"`` is
  upstream's ``int(x)``. On rare sizes (the float product just below a whole number) ``floor`` keeps two rows or
  columns fewer, since the padding is cut symmetrically (see `unpadded_shape`).
- ``anyres_max_N`` downsampling uses floor division ``int(h // times)`` exactly like upstream LLaVA-NeXT and
  transformers' LlavaOnevision (model and processor).
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from typing import Any

from llavakit.anyres.spec import ImageSpec
from llavakit.errors import ConfigError, ImageError

Size = tuple[int, int]

_RANGE_ITEM = re.compile(r"\(\s*(\d+)\s*x\s*(\d+)\s*\)")
_PINPOINT_HELP = (
    'write a list of (width, height) pixel pairs such as "[(336, 672), (672, 336), (672, 672)]" '
    'or a tile range such as "(1x1),...,(3x3)"'
)


def parse_pinpoints(value: Any, tile_size: int, order: str = "wh") -> tuple[Size, ...]:
    """Parse AnyRes candidate resolutions from any upstream or transformers form into ``(height, width)`` pairs.

    Args:
        value: a list/tuple of pairs, a Python-literal string ``"[(336, 672), ...]"``, or the range form
            ``"(1x1),...,(6x6)"`` (counted in tiles, multiplied by ``tile_size``).
        tile_size: tile side in pixels; every pinpoint must be a positive multiple of it.
        order: ``"wh"`` when pairs are ``(width, height)`` (upstream LLaVA-NeXT), ``"hw"`` when ``(height, width)``
            (transformers ``image_grid_pinpoints``). The range form ``(AxB)`` follows the same order.

    Returns:
        The pinpoints as ``(height, width)`` tuples, in input order.

    Raises:
        ConfigError: malformed strings, empty lists, non-positive values or pinpoints that do not tile exactly.
    """
    if order not in ("wh", "hw"):
        raise ConfigError(f"pinpoint order {order!r} must be 'wh' (upstream LLaVA) or 'hw' (transformers)")
    if tile_size <= 0:
        raise ConfigError(f"tile_size must be positive to parse pinpoints, got {tile_size}")
    if isinstance(value, str):
        pairs = _parse_pinpoint_string(value.strip(), tile_size)
    elif isinstance(value, Sequence):
        pairs = [_as_pair(item, value) for item in value]
    else:
        raise ConfigError(
            f"pinpoints must be a list or a string, got {type(value).__name__}: {_PINPOINT_HELP}"
        )
    if not pairs:
        raise ConfigError(f"pinpoints {value!r} is empty: {_PINPOINT_HELP}")
    hw_pairs = tuple((b, a) if order == "wh" else (a, b) for a, b in pairs)
    for h, w in hw_pairs:
        if h <= 0 or w <= 0 or h % tile_size or w % tile_size:
            raise ConfigError(
                f"pinpoint (height={h}, width={w}) in {value!r} is not a positive multiple of the tile size "
                f"{tile_size}: {_PINPOINT_HELP}"
            )
    return hw_pairs


def _parse_pinpoint_string(text: str, tile_size: int) -> list[Size]:
    """Parse the range form (tiles) or a Python-literal list (pixels) into raw pairs in their written order."""
    if "x" in text:
        matches = _RANGE_ITEM.findall(text)
        if not matches:
            raise ConfigError(f"pinpoint range {text!r} has no '(AxB)' item: {_PINPOINT_HELP}")
        (a1, b1), (a2, b2) = (tuple(map(int, m)) for m in (matches[0], matches[-1]))
        if a1 > a2 or b1 > b2 or min(a1, b1) < 1:
            raise ConfigError(f"pinpoint range {text!r} must go from small to large tile counts, each ≥ 1")
        return [(a * tile_size, b * tile_size) for a in range(a1, a2 + 1) for b in range(b1, b2 + 1)]
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise ConfigError(f"cannot parse pinpoints {text!r} ({exc}): {_PINPOINT_HELP}") from exc
    if not isinstance(parsed, (list, tuple)):
        raise ConfigError(f"pinpoints {text!r} is not a list: {_PINPOINT_HELP}")
    return [_as_pair(item, text) for item in parsed]


def _as_pair(item: Any, source: Any) -> Size:
    """One pinpoint as a pair of ints, or a ConfigError naming the offending item."""
    if (
        not isinstance(item, (list, tuple))
        or len(item) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)
    ):
        raise ConfigError(f"pinpoint {item!r} in {source!r} is not a pair of integers: {_PINPOINT_HELP}")
    return int(item[0]), int(item[1])


def select_best_resolution(image_hw: Size, pinpoints: Sequence[Size]) -> Size:
    """The pinpoint that keeps the most image pixels after an aspect-preserving fit, wasting the least canvas.

    For each candidate (h, w): ``s = min(w / W, h / H)``, ``effective = min(int(W*s) * int(H*s), W*H)`` and
    ``wasted = h*w - effective``. The maximum ``effective`` wins; equal ``effective`` is broken by the smaller
    ``wasted``; a full tie (same effective and wasted, e.g. 1×2 and 2×1 tiles for a tiny square image) keeps the
    candidate listed first. Upstream LLaVA and transformers behave identically.

    Args:
        image_hw: original image (height, width) in pixels.
        pinpoints: candidate (height, width) resolutions.

    Returns:
        The chosen (height, width).
    """
    height, width = _check_size(image_hw)
    if not pinpoints:
        raise ConfigError("select_best_resolution needs at least one pinpoint")
    best: Size = (int(pinpoints[0][0]), int(pinpoints[0][1]))
    best_effective, best_wasted = -1, math.inf  # any candidate beats this, so the loop always sets `best`
    for cand_h, cand_w in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_h * cand_w - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(cand_h), int(cand_w)), effective, wasted
    return best


def grid_shape(image_hw: Size, spec: ImageSpec) -> Size:
    """(rows, cols) of grid tiles AnyRes cuts for an image of this size (base view not included).

    Raises:
        ConfigError: if the spec does not tile (``square`` / ``pad``).
    """
    if not spec.uses_anyres:
        raise ConfigError(
            f"grid_shape needs an anyres spec; aspect_ratio {spec.aspect_ratio!r} always yields a single tile"
        )
    best_h, best_w = select_best_resolution(image_hw, spec.pinpoints)
    return best_h // spec.tile_size, best_w // spec.tile_size


def letterbox_size(image_hw: Size, target_hw: Size) -> Size:
    """Size of the image resized to fit ``target_hw`` with its aspect ratio kept.

    The side that fills gets the target exactly; the other gets ``min(ceil(orig * scale), target)`` (upstream
    ``resize_and_pad_image`` and transformers ``get_patch_output_size``).
    """
    height, width = _check_size(image_hw)
    target_h, target_w = target_hw
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpadded_shape(feature_hw: Size, image_hw: Size, rounding: str) -> Size:
    """Shape of a stitched feature map once the letterbox padding rows/columns are removed.

    Args:
        feature_hw: (rows, cols) of the stitched feature map, ``(grid_rows * g, grid_cols * g)``.
        image_hw: original image (height, width).
        rounding: ``"round"`` (transformers ``int(round(x, 7))``) or ``"floor"`` (upstream ``int(x)``).

    Returns:
        (rows, cols) kept. The padding is removed symmetrically, ``(current - new) // 2`` on each side, so an odd
        difference keeps one extra row/column, exactly like both reference implementations. The rules disagree
        only where the float product lands just below a whole number ``n`` (``floor`` gives ``n - 1``): if
        ``current - n`` is even both keep ``n``; if it is odd ``round`` keeps ``n + 1`` and ``floor`` ``n - 1``,
        two fewer (e.g. 48 columns, ``n = 15``: 16 kept versus 14).
    """
    cur_h, cur_w = feature_hw
    height, width = _check_size(image_hw)
    to_int = _ROUNDINGS[rounding]
    if width / height > cur_w / cur_h:
        new_h = to_int(height * (cur_w / width))
        return cur_h - 2 * ((cur_h - new_h) // 2), cur_w
    new_w = to_int(width * (cur_h / height))
    return cur_h, cur_w - 2 * ((cur_w - new_w) // 2)


def downsample_factor(feature_hw: Size, spec: ImageSpec) -> float | None:
    """``anyres_max_N``'s shrink factor ``sqrt(h*w / (N*g*g))`` when it exceeds the tolerance, else None."""
    max_tiles = spec.max_tiles
    if max_tiles is None:
        return None
    times = math.sqrt(feature_hw[0] * feature_hw[1] / (max_tiles * spec.grid_side**2))
    return times if times > spec.downsample_tolerance else None


def downsampled_shape(feature_hw: Size, spec: ImageSpec) -> Size:
    """Unpadded feature-map shape after ``anyres_max_N`` downsampling (unchanged when not needed).

    Uses floor division ``int(h // times)`` like upstream and transformers' LlavaOnevision.
    """
    times = downsample_factor(feature_hw, spec)
    if times is None:
        return feature_hw
    return int(feature_hw[0] // times), int(feature_hw[1] // times)


def count_visual_tokens(image_hw: Size, spec: ImageSpec, tiled: bool = True) -> int:
    """Exact number of visual tokens `merge_image_features` yields for an image of this size.

    Args:
        image_hw: original image (height, width); only the size is needed, never the pixels.
        spec: the preprocessing spec.
        tiled: False for a single-tile image (multi-image samples, non-anyres specs).

    Returns:
        The token count: one ``<image>`` token per visual token after expansion. Equals transformers'
        ``LlavaNextProcessor`` expansion (``spatial_unpad``), ``LlavaOnevisionProcessor`` (``anyres_max_N``), and
        for single tiles ``tokens_per_tile`` (+1 newline with ``spatial_unpad``, as upstream).
    """
    _check_size(image_hw)
    per_tile = spec.tokens_per_tile
    if not (tiled and spec.uses_anyres):
        return per_tile + (1 if spec.merge_type == "spatial_unpad" else 0)
    rows, cols = grid_shape(image_hw, spec)
    if spec.merge_type in ("flat", "spatial"):
        return per_tile * (1 + rows * cols)
    g = spec.grid_side
    unpadded = unpadded_shape((rows * g, cols * g), image_hw, spec.unpad_rounding)
    kept_h, kept_w = downsampled_shape(unpadded, spec)
    return per_tile + kept_h * (kept_w + 1)


def _check_size(image_hw: Size) -> Size:
    """Validate an image (height, width) and return it as ints."""
    if len(image_hw) != 2 or not all(int(x) == x and x > 0 for x in image_hw):
        raise ImageError(
            f"image size {tuple(image_hw)!r} must be a (height, width) pair of positive integers"
        )
    return int(image_hw[0]), int(image_hw[1])


_ROUNDINGS = {"round": lambda x: int(round(x, 7)), "floor": int}
