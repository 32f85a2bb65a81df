"""Frame features → the video-token sequence of one video (2D pooling, then newline layout), as `VideoSpec` says.

Each frame is one tile: the vision encoder and projector give it a ``grid_side``² feature grid, which is pooled 2D
(upstream LLaVA-NeXT ``llava_arch.py get_2dPool``, transformers' ``LlavaOnevisionModel.apply_pooling``):

- ``bilinear``: ``F.interpolate`` to ``ceil(n / stride)`` per side (``align_corners=False``), so a 27² SigLIP grid
  becomes 14² at stride 2;
- ``average`` / ``max``: ``avg_pool2d`` / ``max_pool2d`` with kernel = stride, which floors (27² → 13²).

Then newlines, using the model's learned ``image_newline`` (upstream ``prepare_inputs_labels_for_multimodal``):

- ``one_token``: every frame's tokens in order, then one newline after the whole video (upstream appends it only
  when ``mm_patch_merge_type`` contains ``unpad``; llavakit's video models always have the newline vector);
- ``no_token``: every frame's tokens, nothing else;
- ``frame`` (``add_token_per_frame``): each frame's tokens followed by one newline;
- ``grid`` (``add_token_per_grid``): upstream stacks the frames into one ``(F * side, side)`` map, frame after frame,
  and appends the newline to every row of it. That is the same sequence as "each frame, row by row, a newline after
  each row": frames stay contiguous, and there is no extra newline after a frame or after the video.

Token counts always equal `VideoSpec.count_tokens`, the number the data pipeline expands ``<video>`` to.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from llavakit.anyres.video_spec import VideoSpec
from llavakit.errors import ConfigError


def merge_video_features(
    frame_features: torch.Tensor, grid_side: int, spec: VideoSpec, newline: torch.Tensor | None
) -> torch.Tensor:
    """Pool one video's projected frame features and lay out its tokens with newlines.

    Args:
        frame_features: ``[F, grid_side², D]``, frames in time order, D the LLM hidden size.
        grid_side: patches per side of one frame (``ImageSpec.grid_side``).
        spec: the video spec.
        newline: ``[D]`` learned newline vector; required unless ``spec.newline`` is ``no_token``.

    Returns:
        ``[spec.count_tokens(F, grid_side), D]`` in ``frame_features``' dtype and device.
    """
    pooled = pool_frame_features(frame_features, grid_side, spec)
    return add_video_newlines(pooled, spec, newline)


def pool_frame_features(frame_features: torch.Tensor, grid_side: int, spec: VideoSpec) -> torch.Tensor:
    """2D-pool each frame's feature grid: ``[F, grid_side², D]`` → ``[F, side, side, D]``,
    ``side = spec.pooled_side(grid_side)``."""
    _check_frames(frame_features, grid_side)
    frames, _, dim = frame_features.shape
    grids = frame_features.reshape(frames, grid_side, grid_side, dim).permute(0, 3, 1, 2)
    stride = spec.pool_stride
    if spec.pool_mode == "bilinear":
        side = spec.pooled_side(grid_side)
        pooled = F.interpolate(grids, size=(side, side), mode="bilinear", align_corners=False)
    elif spec.pool_mode == "average":
        pooled = F.avg_pool2d(grids, kernel_size=stride)
    else:
        pooled = F.max_pool2d(grids, kernel_size=stride)
    return pooled.permute(0, 2, 3, 1)


def add_video_newlines(pooled: torch.Tensor, spec: VideoSpec, newline: torch.Tensor | None) -> torch.Tensor:
    """Flatten pooled frames ``[F, side, side, D]`` into video tokens ``[count, D]`` with newlines per ``spec``."""
    frames, side, _, dim = pooled.shape
    if spec.newline == "no_token":
        return pooled.reshape(-1, dim)
    _check_newline(newline, dim, spec)
    assert newline is not None  # guaranteed by _check_newline
    newline = newline.to(pooled)
    if spec.newline == "one_token":
        return torch.cat([pooled.reshape(-1, dim), newline[None]])
    if spec.newline == "frame":
        per_frame = torch.cat(
            [pooled.reshape(frames, side * side, dim), newline.expand(frames, 1, dim)], dim=1
        )
        return per_frame.reshape(-1, dim)
    rows = torch.cat([pooled, newline.expand(frames, side, 1, dim)], dim=2)
    return rows.reshape(-1, dim)


def _check_frames(frame_features: torch.Tensor, grid_side: int) -> None:
    if frame_features.dim() != 3 or frame_features.shape[1] != grid_side * grid_side:
        raise ConfigError(
            f"frame features must be [frames, {grid_side}² = {grid_side * grid_side} tokens, hidden], got shape "
            f"{tuple(frame_features.shape)}: video frames need the vision encoder's patch grid without a CLS token "
            "(select_feature 'patch') at the image spec's tile size"
        )
    if frame_features.shape[0] == 0:
        raise ConfigError("a video has no frames: every video needs at least one frame")


def _check_newline(newline: torch.Tensor | None, dim: int, spec: VideoSpec) -> None:
    if newline is None:
        raise ConfigError(
            f"video_spec.newline {spec.newline!r} appends the learned image_newline, which this model has not "
            "(merge_type 'spatial_unpad' has one): use newline 'no_token' or a spatial_unpad model"
        )
    if newline.shape != (dim,):
        raise ConfigError(
            f"newline has shape {tuple(newline.shape)} but frame features have hidden size {dim}"
        )
