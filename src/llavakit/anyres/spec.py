"""The image preprocessing spec: one value, saved in every checkpoint, used by training, evaluation and serving.

Upstream LLaVA-NeXT spreads these settings over a dozen config keys and hard-codes some of them in the processor;
a run then evaluates with different preprocessing than it trained with. Here they live in one frozen dataclass,
written to ``config.json["llavakit"]["image_spec"]`` and read back by every consumer.

Upstream quirks are named options whose defaults reproduce published checkpoints:

- ``base_view="squash"``: the base view is the whole image resized to ``tile_size``² without keeping its aspect
  ratio (upstream ``process_anyres_image`` FIXME, also what transformers does). ``"letterbox"`` pads instead.
- ``unpad_rounding``: how the unpadded side ``new = H * (cur_w / W)`` becomes an integer. ``"floor"`` is upstream
  LLaVA-NeXT's ``int(x)``, the code the published checkpoints were trained and evaluated with; ``"round"`` is
  transformers' (and vLLM's) ``int(round(x, 7))``. They disagree where the float product lands just below a whole
  number (e.g. 54.99999999999999 for an exact 55): padding is cut from both sides, ``(cur - new) // 2`` each, so
  upstream then keeps **two** fewer rows or columns (a CLIP-336 ``anyres`` image 88 wide and 55 high: 926 visual
  tokens upstream, 976 in transformers); about a hundred CLIP-336 and two hundred SigLIP-384 ``anyres_max_9``
  sizes up to 3000×3000. The shipped LLaVA-NeXT recipes and ``convert from-original`` set ``floor``; llava-hf
  checkpoints (no ``llavakit`` section) load with ``round``, as transformers runs them, and so does a spec built
  in code (the default). Saving a ``floor`` AnyRes checkpoint in the llava-hf layout warns that transformers and
  vLLM will count those rare sizes differently (`llavakit.model.config.LlavaKitConfig.to_config_json`).
- pinpoints are stored as ``(height, width)`` pairs (transformers' order); upstream's ``(width, height)`` strings are
  converted by `llavakit.anyres.geometry.parse_pinpoints` (``order="wh"``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from llavakit.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

ASPECT_RATIOS = ("square", "pad", "anyres")
MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
RESAMPLE_FILTERS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
_ANYRES_MAX = re.compile(r"^anyres_max_(\d+)$")


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes tiles and how tile features become visual tokens.

    Attributes:
        tile_size: side of one tile in pixels (the vision encoder's ``image_size``, e.g. 336 or 384).
        patch_size: ViT patch size; ``tile_size // patch_size`` tokens per side (need not divide the tile size).
        aspect_ratio: ``square`` | ``pad`` | ``anyres`` | ``anyres_max_N``.
        pinpoints: candidate (height, width) resolutions for AnyRes, each a multiple of ``tile_size``.
        merge_type: ``flat`` | ``spatial`` | ``spatial_unpad`` (upstream ``mm_patch_merge_type``).
        image_mean, image_std: per-channel normalisation.
        resample: PIL resampling filter name for resizes (``bicubic`` like CLIP/SigLIP processors).
        base_view: ``squash`` (upstream/transformers) | ``letterbox``.
        unpad_rounding: ``round`` (transformers/vLLM ``int(round(x, 7))``) | ``floor`` (upstream ``int()``).
        downsample_tolerance: ``anyres_max_N`` downsamples only when the ratio exceeds this (upstream 1.1).
        multi_image_aspect_ratio: preprocessing of images in multi-image samples (upstream forces ``pad``).
        select_feature: ``patch`` (drop CLS) | ``cls_patch`` (keep CLS; only valid with ``flat`` merge).
    """

    tile_size: int = 336
    patch_size: int = 14
    aspect_ratio: str = "anyres"
    pinpoints: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    merge_type: str = "spatial_unpad"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resample: str = "bicubic"
    base_view: str = "squash"
    unpad_rounding: str = "round"
    downsample_tolerance: float = 1.1
    multi_image_aspect_ratio: str = "pad"
    select_feature: str = "patch"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pinpoints", tuple((int(h), int(w)) for h, w in self.pinpoints))
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        self._validate()

    def _validate(self) -> None:
        # no divisibility check: SigLIP-so400m uses 384 px tiles with 14 px patches (27 tokens per side; the
        # patch convolution drops the 6-pixel remainder), exactly as transformers' `tile_size // patch_size`
        if self.patch_size <= 0 or self.tile_size < self.patch_size:
            raise ConfigError(
                f"image_spec: tile_size {self.tile_size} must be at least patch_size {self.patch_size} (both positive)"
            )
        if self.aspect_ratio not in ASPECT_RATIOS and not _ANYRES_MAX.match(self.aspect_ratio):
            raise ConfigError(
                f"image_spec.aspect_ratio {self.aspect_ratio!r} is not one of {', '.join(ASPECT_RATIOS)}, anyres_max_N"
            )
        self._validate_choices()
        if self.select_feature == "cls_patch" and self.merge_type != "flat":
            raise ConfigError(
                "select_feature 'cls_patch' keeps the CLS token, which has no grid position: use merge_type 'flat'"
            )
        if self.max_tiles is not None and self.merge_type != "spatial_unpad":
            raise ConfigError(
                f"{self.aspect_ratio} downsamples unpadded features: it needs merge_type 'spatial_unpad'"
            )
        if self.uses_anyres:
            self._validate_pinpoints()

    def _validate_choices(self) -> None:
        """Every enumerated field holds one of its allowed values."""
        choices = {
            "multi_image_aspect_ratio": ("pad", "square"),
            "merge_type": MERGE_TYPES,
            "resample": RESAMPLE_FILTERS,
            "base_view": ("squash", "letterbox"),
            "unpad_rounding": ("round", "floor"),
            "select_feature": ("patch", "cls_patch"),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"image_spec.{name} {value!r} is not one of {', '.join(allowed)}")

    def _validate_pinpoints(self) -> None:
        """AnyRes needs at least one pinpoint, each an exact multiple of the tile size."""
        if not self.pinpoints:
            raise ConfigError(f"aspect_ratio {self.aspect_ratio!r} needs pinpoints (image_grid_pinpoints)")
        for h, w in self.pinpoints:
            if h <= 0 or w <= 0 or h % self.tile_size or w % self.tile_size:
                raise ConfigError(
                    f"pinpoint ({h}, {w}) is not a positive multiple of the tile size {self.tile_size}: "
                    "every pinpoint must tile exactly (e.g. use the '(1x1),...,(3x3)' range form)"
                )

    @property
    def grid_side(self) -> int:
        """Tokens per side of one tile's feature map (``tile_size // patch_size``, e.g. 384 // 14 = 27)."""
        return self.tile_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens one tile yields before merging (+1 for the CLS token with ``cls_patch``)."""
        return self.grid_side**2 + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def uses_anyres(self) -> bool:
        """True when single images are tiled (``anyres`` or ``anyres_max_N``)."""
        return self.aspect_ratio == "anyres" or self.max_tiles is not None

    @property
    def max_tiles(self) -> int | None:
        """N of ``anyres_max_N`` (the cap on grid tokens, in tiles), else None."""
        match = _ANYRES_MAX.match(self.aspect_ratio)
        return int(match.group(1)) if match else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        data = asdict(self)
        data["pinpoints"] = [list(p) for p in self.pinpoints]
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageSpec:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"image_spec has unknown fields {unknown}; known fields: {sorted(known)}")
        values = dict(data)
        if "pinpoints" in values:
            values["pinpoints"] = tuple(tuple(p) for p in values["pinpoints"])
        return cls(**values)
