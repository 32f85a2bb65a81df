"""Both unpad rules against their references, on image sizes where the references disagree, found by search.

Upstream LLaVA-NeXT's ``unpad_image`` computes the unpadded side as ``int(H * (cur_w / W))`` and slices
``[padding : cur - padding]`` with ``padding = (cur - new) // 2``; transformers' is the same with
``int(round(x, 7))``. The oracles here: upstream's arithmetic written out in this file (grid choice with its
(width, height) pinpoints, unpad, ``anyres_max_N`` downsampling, newline column), and transformers' own
processors (``_get_number_of_features``) and ``unpad_image``. Both run on the real grids of the shipped recipes:
LLaVA-NeXT's CLIP-336 ``anyres`` pinpoints and SigLIP-384 ``anyres_max_9`` with ``(1x1),...,(6x6)``.

The search scans every (height, width) up to 3000 (numpy float64 gives the same IEEE products as Python) for a
product ``a * (k / b)`` within 1e-6 below a whole number, ``k`` any side of a stitched feature map: only there can
the rules differ. An exhaustive small range and a random sample, checked in full, guard the search itself.

Which path records which rule: the shipped LLaVA-NeXT recipes and original-layout imports ``floor``, llava-hf
checkpoints ``round``; a ``floor`` checkpoint is still written for transformers, with a warning.
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
from dataclasses import dataclass, replace
from functools import cache
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad_image
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from llavakit.anyres.features import merge_image_features, stitch_tiles, unpad_feature_map
from llavakit.anyres.geometry import count_visual_tokens, grid_shape, parse_pinpoints
from llavakit.anyres.spec import ImageSpec
from llavakit.model.config import LlavaKitConfig
from llavakit.training.recipes import recipe_dict, recipe_names

MAX_SIDE = 3000
SMALL_SIDE = 90
RANDOM_SIZES = 1500


@dataclass(frozen=True)
class Grid:
    """One real AnyRes setup: our spec (rule ``round``) and upstream's raw (width, height) pinpoints."""

    name: str
    spec: ImageSpec
    upstream_pinpoints_wh: tuple[tuple[int, int], ...]

    def with_rule(self, rule: str) -> ImageSpec:
        return replace(self.spec, unpad_rounding=rule)


def _upstream_pinpoints(text: str, tile: int) -> tuple[tuple[int, int], ...]:
    """Upstream's reading of ``image_grid_pinpoints``: (width, height) pixels; the range form counts tiles."""
    if "x" in text:
        ranges = re.findall(r"\((\d+)x(\d+)\)", text)
        (a1, b1), (a2, b2) = tuple(map(int, ranges[0])), tuple(map(int, ranges[-1]))
        return tuple((i * tile, j * tile) for i in range(a1, a2 + 1) for j in range(b1, b2 + 1))
    return tuple(tuple(p) for p in ast.literal_eval(text))


def _recipe_grid(recipe: str, name: str) -> Grid:
    """The recipe's last image spec (model section, then each stage's changes), with its upstream pinpoints."""
    data = recipe_dict(recipe)
    fields = dict(data["model"]["image_spec"])
    for stage in data["stages"]:
        fields.update(stage.get("image_spec", {}))
    tile = fields["tile_size"]
    spec = ImageSpec(
        tile_size=tile,
        patch_size=fields["patch_size"],
        aspect_ratio=fields["aspect_ratio"],
        pinpoints=parse_pinpoints(fields["pinpoints"], tile, order="wh"),
        merge_type=fields["merge_type"],
    )
    return Grid(name, spec, _upstream_pinpoints(fields["pinpoints"], tile))


@cache
def grids() -> dict[str, Grid]:
    return {
        "clip336-anyres": _recipe_grid("open-llava-next-vicuna-7b", "clip336-anyres"),
        "siglip384-anyres_max_9": _recipe_grid("qwen2.5-0.5b-siglip", "siglip384-anyres_max_9"),
    }


# ---- upstream's arithmetic (LLaVA-NeXT llava/mm_utils.py and llava/model/llava_arch.py), sizes as (w, h) ----


def _upstream_best_resolution(width: int, height: int, pinpoints_wh) -> tuple[int, int]:
    best, best_effective, best_wasted = None, 0, float("inf")
    for cand_w, cand_h in pinpoints_wh:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_w, cand_h), effective, wasted
    return best


def _upstream_unpad_slices(cur_h: int, cur_w: int, width: int, height: int) -> tuple[slice, slice]:
    """The row and column slices upstream's ``unpad_image`` takes of a ``cur_h x cur_w`` map."""
    if width / height > cur_w / cur_h:
        new_h = int(height * (cur_w / width))
        pad = (cur_h - new_h) // 2
        return slice(pad, cur_h - pad), slice(None)
    new_w = int(width * (cur_h / height))
    pad = (cur_w - new_w) // 2
    return slice(None), slice(pad, cur_w - pad)


def _upstream_merge(tiles: torch.Tensor, width: int, height: int, grid: Grid, newline: torch.Tensor):
    """Upstream's ``spatial_unpad`` merge of ``[1 + n, g*g, D]`` tile features into ``[tokens, D]``."""
    g = grid.spec.grid_side
    best_w, best_h = _upstream_best_resolution(width, height, grid.upstream_pinpoints_wh)
    cols, rows = best_w // grid.spec.tile_size, best_h // grid.spec.tile_size
    dim = tiles.shape[-1]
    stitched = tiles[1:].view(rows, cols, g, g, dim).permute(4, 0, 2, 1, 3).reshape(dim, rows * g, cols * g)
    row_cut, col_cut = _upstream_unpad_slices(rows * g, cols * g, width, height)
    kept = stitched[:, row_cut, col_cut]
    if grid.spec.max_tiles is not None:
        h, w = kept.shape[1:]
        times = math.sqrt(h * w / (grid.spec.max_tiles * g**2))
        if times > 1.1:
            kept = F.interpolate(kept[None], [int(h // times), int(w // times)], mode="bilinear")[0]
    with_newline = torch.cat([kept, newline[:, None, None].expand(dim, kept.shape[1], 1)], dim=2)
    return torch.cat([tiles[0], with_newline.flatten(1).T])


def upstream_tokens(image_hw: tuple[int, int], grid: Grid) -> int:
    height, width = image_hw
    g = grid.spec.grid_side
    best_w, best_h = _upstream_best_resolution(width, height, grid.upstream_pinpoints_wh)
    cur_h, cur_w = best_h // grid.spec.tile_size * g, best_w // grid.spec.tile_size * g
    row_cut, col_cut = _upstream_unpad_slices(cur_h, cur_w, width, height)
    h, w = len(range(cur_h)[row_cut]), len(range(cur_w)[col_cut])
    if grid.spec.max_tiles is not None:
        times = math.sqrt(h * w / (grid.spec.max_tiles * g**2))
        if times > 1.1:
            h, w = int(h // times), int(w // times)
    return g * g + h * (w + 1)


# ---- transformers: its processors' own token counting (the model expands <image> by it) ----


@cache
def _hf_processor(name: str):
    spec = grids()[name].spec
    image_processor = SimpleNamespace(image_grid_pinpoints=[list(p) for p in spec.pinpoints])
    if spec.max_tiles is None:
        processor = object.__new__(LlavaNextProcessor)
        processor.patch_size, processor.num_additional_image_tokens = spec.patch_size, 0
    else:
        processor = object.__new__(LlavaOnevisionProcessor)
        processor.num_image_tokens, processor.vision_aspect_ratio = spec.grid_side**2, spec.aspect_ratio
    processor.image_processor = image_processor
    return processor


def transformers_tokens(image_hw: tuple[int, int], grid: Grid) -> int:
    tile = grid.spec.tile_size
    return _hf_processor(grid.name)._get_number_of_features(image_hw[0], image_hw[1], tile, tile)


# ---- the search ----


def _map_sides(spec: ImageSpec) -> list[int]:
    """Every row or column count a stitched feature map of this spec can have."""
    g = spec.grid_side
    return sorted({g * (side // spec.tile_size) for pinpoint in spec.pinpoints for side in pinpoint})


def candidate_sizes(spec: ImageSpec, max_side: int) -> set[tuple[int, int]]:
    """(height, width) sizes whose unpadding product ``a * (k / b)`` lies within 1e-6 below a whole number."""
    found: set[tuple[int, int]] = set()
    sides = np.arange(1, max_side + 1, dtype=np.float64)
    for k in _map_sides(spec):
        for start in range(0, max_side, 500):
            divisors = sides[start : start + 500]
            product = sides[:, None] * (k / divisors[None, :])
            rows, cols = np.nonzero(np.floor(product) != np.floor(product + 1e-6))
            for a, b in zip((rows + 1).tolist(), (cols + start + 1).tolist()):
                found.update({(a, b), (b, a)})  # a is the unpadded side's own length, in either orientation
    return found


@cache
def differing_sizes(name: str) -> list[tuple[int, int]]:
    grid = grids()[name]
    return sorted(
        size
        for size in candidate_sizes(grid.spec, MAX_SIDE)
        if upstream_tokens(size, grid) != transformers_tokens(size, grid)
    )


# ---- tests ----

GRID_NAMES = ["clip336-anyres", "siglip384-anyres_max_9"]


@pytest.mark.parametrize("name", GRID_NAMES)
def test_search_finds_sizes_where_upstream_and_transformers_differ(name, record_property):
    grid = grids()[name]
    found = differing_sizes(name)
    record_property("differing_sizes", len(found))
    print(f"\n{name}: {len(found)} sizes up to {MAX_SIDE}x{MAX_SIDE} where upstream and transformers differ")
    assert found, "the search found no size where int() and round(x, 7) disagree: the search is broken"
    for size in found:
        assert count_visual_tokens(size, grid.with_rule("floor")) == upstream_tokens(size, grid), size
        assert count_visual_tokens(size, grid.with_rule("round")) == transformers_tokens(size, grid), size


@pytest.mark.parametrize("name", ["clip336-anyres"])
def test_where_the_rules_differ_upstream_keeps_two_rows_or_columns_fewer(name):
    grid = grids()[name]  # no downsampling: token counts are base + kept_rows * (kept_cols + 1)
    for size in differing_sizes(name):
        rows, cols = grid_shape(size, grid.spec)
        cur = torch.zeros(1, rows * grid.spec.grid_side, cols * grid.spec.grid_side)
        theirs = hf_unpad_image(cur, list(size)).shape[1:]
        row_cut, col_cut = _upstream_unpad_slices(*cur.shape[1:], size[1], size[0])
        upstream = cur[:, row_cut, col_cut].shape[1:]
        differences = sorted(a - b for a, b in zip(theirs, upstream))
        assert differences == [0, 2], (size, tuple(theirs), tuple(upstream))


@pytest.mark.parametrize("name", GRID_NAMES)
def test_feature_maps_follow_each_rule(name):
    """Our unpadded maps equal upstream's slices (``floor``) and transformers' ``unpad_image`` (``round``), value
    for value, and the whole ``floor`` merge equals upstream's, on differing sizes and a few ordinary ones."""
    grid = grids()[name]
    rng = random.Random(1)
    sizes = rng.sample(differing_sizes(name), 12) + [
        (rng.randint(1, 2000), rng.randint(1, 2000)) for _ in range(4)
    ]
    g, dim = grid.spec.grid_side, 2
    generator = torch.Generator().manual_seed(0)
    newline = torch.randn(dim, generator=generator)
    for size in sizes:
        rows, cols = grid_shape(size, grid.spec)
        tiles = torch.randn(1 + rows * cols, g * g, dim, generator=generator)
        stitched = stitch_tiles(tiles[1:], rows, cols)
        row_cut, col_cut = _upstream_unpad_slices(*stitched.shape[1:], size[1], size[0])
        assert torch.equal(unpad_feature_map(stitched, size, "floor"), stitched[:, row_cut, col_cut]), size
        assert torch.equal(
            unpad_feature_map(stitched, size, "round"), hf_unpad_image(stitched, list(size))
        ), size
        ours = merge_image_features(tiles, size, grid.with_rule("floor"), newline)
        assert torch.equal(ours, _upstream_merge(tiles, size[1], size[0], grid, newline)), size
        assert ours.shape[0] == upstream_tokens(size, grid)
        assert merge_image_features(tiles, size, grid.with_rule("round"), newline).shape[
            0
        ] == transformers_tokens(size, grid)


@pytest.mark.parametrize("name", GRID_NAMES)
def test_both_rules_match_their_oracle_everywhere_and_the_search_misses_nothing(name):
    """Every size up to SMALL_SIDE² and a random sample up to MAX_SIDE: ``floor`` is upstream, ``round`` is
    transformers; every small size where they differ is one the search proposes."""
    grid = grids()[name]
    floor_spec, round_spec = grid.with_rule("floor"), grid.with_rule("round")
    rng = random.Random(0)
    small = [(h, w) for h in range(1, SMALL_SIDE + 1) for w in range(1, SMALL_SIDE + 1)]
    sampled = [(rng.randint(1, MAX_SIDE), rng.randint(1, MAX_SIDE)) for _ in range(RANDOM_SIZES)]
    candidates = candidate_sizes(grid.spec, SMALL_SIDE)
    for size in small + sampled:
        upstream, theirs = upstream_tokens(size, grid), transformers_tokens(size, grid)
        assert count_visual_tokens(size, floor_spec) == upstream, size
        assert count_visual_tokens(size, round_spec) == theirs, size
        if upstream != theirs and max(size) <= SMALL_SIDE:
            assert size in candidates, f"{size} differs but the search did not propose it"


def test_recipes_reproducing_upstream_unpad_like_upstream():
    """Shipped recipes that tile with ``spatial_unpad`` and mirror an upstream script train with ``floor``."""
    checked = []
    for recipe in recipe_names():
        data = recipe_dict(recipe)
        spec = data["model"].get("image_spec", {})
        # the demo is llavakit's own tiny model, trained and evaluated only by llavakit
        if recipe.startswith("demo") or spec.get("merge_type") != "spatial_unpad":
            continue
        assert spec.get("unpad_rounding") == "floor", recipe
        checked.append(recipe)
    assert checked


def test_a_floor_checkpoint_stays_loadable_by_transformers_and_warns_that_it_counts_differently(
    checkpoint, tmp_path
):
    from llavakit.model.llava_next import LlavaNextModel

    model = LlavaNextModel.from_pretrained(checkpoint)
    model.config.image_spec = replace(model.config.image_spec, unpad_rounding="floor")
    with pytest.warns(UserWarning, match=r"'floor' .* transformers and vLLM unpad with round\(x, 7\)"):
        folder = model.save_pretrained(tmp_path / "floor")
    data = json.loads((folder / "config.json").read_text())
    assert data["model_type"] == "llava_next" and data["llavakit"]["image_spec"]["unpad_rounding"] == "floor"
    assert LlavaKitConfig.from_config_json(data).image_spec.unpad_rounding == "floor"


def test_a_llava_hf_checkpoint_loads_with_the_rule_transformers_runs_it_with(checkpoint):
    data = json.loads((checkpoint / "config.json").read_text())
    del data["llavakit"]
    for section in (data, {**data, "model_type": "llava_onevision", "vision_aspect_ratio": "anyres_max_9"}):
        assert LlavaKitConfig.from_config_json(section).image_spec.unpad_rounding == "round"


def test_an_original_layout_import_unpads_like_upstream(preset_model, preset_parts, tmp_path):
    from llavakit.conversion.original import export_original, import_original

    path = export_original(preset_model("debug-clip-llama"), tmp_path / "original")
    imported = import_original(path, vision=str(preset_parts("debug-clip-llama").vision_dir))
    assert imported.config.image_spec.unpad_rounding == "floor"
