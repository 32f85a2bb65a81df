"""The video spec: how a video becomes frames and how frame features become video tokens (LLaVA-NeXT / OneVision).

Upstream LLaVA-NeXT (``llava/utils.py process_video_with_decord``, ``llava_arch.py``) samples frames at
``video_fps`` frames per second of video (step ``round(avg_fps / video_fps)``) and, when there are more than
``frames_upbound`` of them or ``force_sample`` is set, takes ``frames_upbound`` frames spread evenly
(``np.linspace(0, total - 1, frames_upbound)``). Each frame is one tile, preprocessed by the vision tower's own
processor (no AnyRes); its features, after the projector, are pooled 2D by ``pool_stride`` (upstream's
``get_2dPool``: ``bilinear`` gives ceil(27 / 2) = 14 per side for SigLIP-384, ``average``/``max`` floor it to 13) and
followed by newline tokens placed as ``mm_newline_position`` says. transformers' ``LlavaOnevision`` runs videos as
``one_token`` with bilinear pooling at stride 2; LLaVA-Video's recipes use ``grid`` and ``force_sample``.

Upstream quirk, kept as a named option: ``get_2dPool`` is called with its default stride 2 whatever
``mm_spatial_pool_stride`` says; here ``pool_stride`` is what pools (set it to 2 to match published checkpoints).

Like `ImageSpec`, one frozen value saved in the checkpoint (``config.json["llavakit"]["video_spec"]``) and read by
training, evaluation and serving.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from llavakit.errors import ConfigError

POOL_MODES = ("bilinear", "average", "max")
NEWLINE_POSITIONS = ("one_token", "no_token", "frame", "grid")
FRAME_VIEWS = ("squash", "crop")


@dataclass(frozen=True)
class VideoSpec:
    """How frames are sampled and preprocessed, and how their features become tokens.

    Attributes:
        frames_upbound: most frames per video (upstream ``frames_upbound``; 0: no bound, every sampled frame).
        video_fps: frames sampled per second of video before the bound applies (upstream ``video_fps``).
        force_sample: always take ``frames_upbound`` evenly spread frames (upstream ``force_sample``).
        frame_view: ``squash`` resizes each frame to ``tile_size``² (SigLIP's processor, transformers'
            LlavaOnevision video processor) | ``crop`` resizes the shortest edge then centre-crops (CLIP's).
        pool_stride: 2D pooling stride on each frame's feature grid (1: no pooling).
        pool_mode: ``bilinear`` (output side ceil(n / stride)) | ``average`` | ``max`` (floor(n / stride)).
        newline: ``one_token`` (one learned newline after the whole video) | ``no_token`` | ``frame`` (one after each
            frame) | ``grid`` (one after each row of each frame's pooled grid).
        add_time_instruction: prepend upstream's sentence giving the video's length and the sampled frames' times
            to the first user turn.
    """

    frames_upbound: int = 32
    video_fps: int = 1
    force_sample: bool = False
    frame_view: str = "squash"
    pool_stride: int = 2
    pool_mode: str = "bilinear"
    newline: str = "one_token"
    add_time_instruction: bool = False

    def __post_init__(self) -> None:
        self._check_types()
        if self.frames_upbound < 0:
            raise ConfigError(f"video_spec.frames_upbound {self.frames_upbound} must be >= 0 (0: no bound)")
        if self.force_sample and self.frames_upbound == 0:
            raise ConfigError("video_spec.force_sample needs frames_upbound > 0 (how many frames to spread)")
        if self.video_fps <= 0 or self.pool_stride <= 0:
            raise ConfigError(
                f"video_spec.video_fps {self.video_fps} and pool_stride {self.pool_stride} must be positive"
            )
        for name, allowed in (
            ("pool_mode", POOL_MODES),
            ("newline", NEWLINE_POSITIONS),
            ("frame_view", FRAME_VIEWS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"video_spec.{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )

    def _check_types(self) -> None:
        """Each field has its declared type (YAML's "false" or "32" would otherwise pass or fail obscurely)."""
        for name, kind in (
            ("frames_upbound", int),
            ("video_fps", int),
            ("pool_stride", int),
            ("force_sample", bool),
            ("add_time_instruction", bool),
            ("frame_view", str),
            ("pool_mode", str),
            ("newline", str),
        ):
            value = getattr(self, name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"video_spec.{name} must be a {kind.__name__}, got {value!r}")

    def pooled_side(self, grid_side: int) -> int:
        """Tokens per side of one frame after pooling a ``grid_side``² feature grid."""
        if self.pool_mode == "bilinear":
            return math.ceil(grid_side / self.pool_stride)
        return grid_side // self.pool_stride

    def count_tokens(self, num_frames: int, grid_side: int) -> int:
        """Video tokens for ``num_frames`` frames whose feature grid is ``grid_side``² before pooling."""
        side = self.pooled_side(grid_side)
        per_frame = side * side + {"grid": side, "frame": 1}.get(self.newline, 0)
        return num_frames * per_frame + (1 if self.newline == "one_token" else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoSpec:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(
                f"video_spec: unknown key(s) {unknown}; valid: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)
