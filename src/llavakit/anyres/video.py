"""Video reading and frame preprocessing: a video file or frame folder becomes ``[F, 3, S, S]`` normalised frames.

`load_video` samples frames with upstream LLaVA-NeXT's rules (``llava/utils.py process_video_with_decord`` and the
``shareVideoGPTV`` frame-folder branch of ``llava/train/train.py LazySupervisedDataset._get_item``), decoding with
PyAV (its wheels bundle FFmpeg) instead of decord. Like decord, the frame count is the number of video packets
the demuxer finds (decord's ``len(VideoReader)`` is its packet index) and the rate is the stream's average frame
rate (``avg_frame_rate``); see `sample_indices`. Counting packets reads the file once without decoding, which is
cheap next to decoding, and is exact where container headers are missing (WebM/MKV store no frame count) or stale.
The sampled frames are then decoded in one sequential pass that stops after the last sampled frame and keeps only
the sampled frames as PIL images, so a long video never sits in memory.

Unlike decord, which pads a short read with cached frames, every inconsistency fails loudly with `VideoError`: a
header frame count above the packets found, a decode error, fewer decoded frames than the sampled indices need, or,
for a video-only file whose header has no frame count (WebM, MKV), a header duration well beyond the packets found.
Damage inside a frame's data that FFmpeg's decoders conceal goes unnoticed, as with decord.

Upstream quirks and the choices made here:

- ``step = round(avg_fps / video_fps)`` uses Python's round-half-to-even; a step of 0 (a video slower than half of
  ``video_fps``) makes upstream's ``range`` raise, here it is 1 (every frame).
- Frame times are ``index / avg_fps`` seconds in every path. Upstream's stride path divides by the *step* instead
  (its variable ``avg_fps`` holds the step), which equals seconds only when ``video_fps`` is 1 and the rate is a
  whole number; its ``frames_upbound`` path and all published LLaVA-Video recipes (``force_sample``) use seconds.
- Frame folders (upstream: paths containing ``shareVideoGPTV``; here: any folder) take 10 frames, or
  ``frames_upbound`` with ``force_sample``, spread by ``np.linspace`` over the files sorted by name (so
  ``frame_10`` sorts before ``frame_2``), at a hard-coded 2 frames per second; ``video_fps`` is ignored. Hidden
  files (``.DS_Store``) are skipped, where upstream would try to open them as frames.
- ``np.linspace(..., dtype=int)`` floors, and repeats indices when a video has fewer frames than the bound; the
  repeated frames are kept, as upstream does.
- Display rotation metadata is not applied (decord applies 90/270 degree rotations; PyAV does not).

A caller reading untrusted files (the server, `llavakit.serving.media`) passes a `DecodeGuard` to `probe_video`
and `load_video`: the FFmpeg demuxer forced instead of probed, FFmpeg options (e.g. ``protocol_whitelist``), a
per-frame pixel cap FFmpeg enforces before allocating a frame (its ``max_pixels``), and a callback run on every
decoded frame (a deadline, a pixel budget). Without one (training, inference on local files) nothing changes.

`probe_video` does everything `load_video` does but decode: it returns the sampled frames' indices and times, the
length and the rate (a `VideoProbe`), so the data layer counts a video's tokens and writes its time instruction
when it scans a dataset, without decoding a frame.

`process_frames` turns each frame into one tile with the vision tower's own processor (no AnyRes): ``squash``
resizes to S×S (``SiglipImageProcessor``, transformers' LlavaOnevision video processor), ``crop`` resizes the
shortest edge then centre-crops (``CLIPImageProcessor``), reusing `llavakit.anyres.pixels`' resize, tiling and
normalisation so the pixels are bit-identical to those processors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from llavakit.anyres.pixels import frame_tiles, is_url, load_image
from llavakit.anyres.spec import ImageSpec
from llavakit.anyres.video_spec import VideoSpec
from llavakit.errors import ImageError, VideoError

if TYPE_CHECKING:
    import av

VideoSource = str | os.PathLike

# upstream's frame-folder branch: the rate its frames were extracted at, and how many it samples
FOLDER_FPS = 2.0
FOLDER_FRAMES = 10
# A video-only file without a frame count in its header whose packets end this much before the container's duration
# is truncated (a WebM or MKV cut short keeps its header duration); the margin tolerates variable frame rates, whose
# packets / average rate only approximates the duration. Smaller cuts of such files go unnoticed.
_TRUNCATION_MARGIN_S = 1.0
_TRUNCATION_MARGIN_FRACTION = 0.1


@dataclass(frozen=True)
class Video:
    """The sampled frames of one video and where they sit in it.

    Attributes:
        frames: the sampled frames, RGB PIL images in time order (a frame repeats if it was sampled twice).
        frame_times: each sampled frame's time in seconds (``index / source_fps``).
        duration: the video's length in seconds (``total_frames / source_fps``, as upstream).
        source_fps: the stream's average frame rate (2 for frame folders).
        total_frames: frames in the video (video packets; files in a frame folder).
        frame_indices: each sampled frame's index among the ``total_frames``.
    """

    frames: list[Image.Image]
    frame_times: list[float]
    duration: float
    source_fps: float
    total_frames: int
    frame_indices: list[int]


def sample_indices(total_frames: int, fps: float, spec: VideoSpec) -> list[int]:
    """Upstream's ``process_video_with_decord`` rule: every ``round(fps / video_fps)``-th frame, or, when that gives
    more than ``frames_upbound`` frames or ``force_sample`` is set, ``frames_upbound`` frames spread by
    ``np.linspace(0, total_frames - 1, frames_upbound, dtype=int)``."""
    step = max(1, round(fps / spec.video_fps))
    indices = list(range(0, total_frames, step))
    if spec.frames_upbound > 0 and (len(indices) > spec.frames_upbound or spec.force_sample):
        indices = np.linspace(0, total_frames - 1, spec.frames_upbound, dtype=int).tolist()
    return indices


def folder_indices(total_frames: int, spec: VideoSpec) -> list[int]:
    """Upstream's frame-folder rule: ``FOLDER_FRAMES`` (or ``frames_upbound`` with ``force_sample``) frames spread
    by ``np.linspace(0, total_frames - 1, n, dtype=int)``."""
    count = spec.frames_upbound if spec.force_sample else FOLDER_FRAMES
    return np.linspace(0, total_frames - 1, count, dtype=int).tolist()


@dataclass(frozen=True)
class DecodeGuard:
    """Limits for reading an untrusted video file with `probe_video` / `load_video` (frame folders ignore it).

    Attributes:
        demuxer: the FFmpeg demuxer to use (``av.open(format=...)``, e.g. ``"matroska"``) instead of letting FFmpeg
            probe the bytes with every demuxer it has; None: probe.
        options: FFmpeg options given to ``av.open`` (the container and the decoders ``find_stream_info`` opens),
            e.g. ``{"protocol_whitelist": "file"}``.
        max_frame_pixels: FFmpeg's ``max_pixels`` for the decoder: a frame above it fails to decode (as FFmpeg's
            "invalid data") before its buffer is allocated; None: FFmpeg's own bound.
        on_frame: called as ``on_frame(index, width, height)`` for every decoded frame, sampled or not, before it
            is kept; it raises to stop decoding (a deadline, a memory budget).
    """

    demuxer: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    max_frame_pixels: int | None = None
    on_frame: Callable[[int, int, int], None] | None = None


@dataclass(frozen=True)
class VideoProbe:
    """What `load_video` would sample, known without decoding a frame (see `probe_video`).

    Attributes:
        frame_indices: each frame to sample, as an index among the ``total_frames``.
        frame_times: each sampled frame's time in seconds (``index / source_fps``).
        duration: the video's length in seconds (``total_frames / source_fps``).
        source_fps: the stream's average frame rate (2 for frame folders).
        total_frames: frames in the video (video packets; files in a frame folder).
    """

    frame_indices: list[int]
    frame_times: list[float]
    duration: float
    source_fps: float
    total_frames: int

    @property
    def num_frames(self) -> int:
        """Frames `load_video` returns (a repeated index counts each time)."""
        return len(self.frame_indices)


def probe_video(source: VideoSource, spec: VideoSpec, guard: DecodeGuard | None = None) -> VideoProbe:
    """The frames `load_video` samples from ``source`` and their times, without decoding: a file is demuxed once
    (its packets counted, as `load_video` does, opened as ``guard`` says), a frame folder only listed.

    Raises:
        VideoError: as `load_video`, for a URL, a missing, still-image, corrupt or frameless source (a frame that
            fails to decode is only found by `load_video`).
    """
    path, label = _local_source(source)
    if path.is_dir():
        total = len(_frame_names(path, label))
        return _probe(folder_indices(total, spec), FOLDER_FPS, total)
    with _open(path, label, guard) as container:
        stream = _video_stream(container, label)
        fps = _average_rate(stream, label)
        total = _count_frames(container, stream, fps, label)
    return _probe(sample_indices(total, fps, spec), fps, total)


def _probe(indices: list[int], fps: float, total: int) -> VideoProbe:
    return VideoProbe(indices, [index / fps for index in indices], total / fps, fps, total)


def load_video(source: VideoSource, spec: VideoSpec, guard: DecodeGuard | None = None) -> Video:
    """Sample and decode the frames of a local video file or a folder of frame images.

    Args:
        source: a video file PyAV (FFmpeg) can read (mp4, webm, mkv, avi, mov, gif, ...) or a folder of frame
            images (upstream's ``shareVideoGPTV`` layout, one image file per frame, named in time order).
        spec: the sampling settings (``video_fps``, ``frames_upbound``, ``force_sample``).
        guard: limits for an untrusted file (see `DecodeGuard`); whatever its ``on_frame`` raises propagates.

    Returns:
        The `Video` with the sampled frames, their times, and the video's length, rate and frame count.

    Raises:
        VideoError: the source is a URL, missing, an image, corrupt, truncated, or has no frames.
    """
    probe = probe_video(source, spec, guard)
    path, label = _local_source(source)
    if path.is_dir():
        names = _frame_names(path, label)
        decoded = {index: _load_frame(path / names[index], label) for index in set(probe.frame_indices)}
    else:
        with _open(path, label, guard) as container:
            decoded = _decode(container, set(probe.frame_indices), probe.total_frames, label, guard)
    return Video(
        frames=[decoded[index] for index in probe.frame_indices],
        frame_times=probe.frame_times,
        duration=probe.duration,
        source_fps=probe.source_fps,
        total_frames=probe.total_frames,
        frame_indices=probe.frame_indices,
    )


def _local_source(source: VideoSource) -> tuple[Path, str]:
    """``(path, label)`` of an existing local file or folder; `VideoError` for anything else."""
    if not isinstance(source, (str, os.PathLike)):
        raise VideoError(f"cannot load a video from a {type(source).__name__}: pass a file or folder path")
    path = Path(source)
    label = f"video {os.fspath(source)!r}"
    if is_url(source):
        raise VideoError(
            f"{label} is a URL, but videos are read from local files here: download it first (e.g. `curl -O URL`) "
            "and pass the file"
        )
    if not path.is_dir() and not path.is_file():
        raise VideoError(f"{label} does not exist (looked for {path.absolute()}): check the path")
    return path, label


def _frame_names(folder: Path, label: str) -> list[str]:
    """Upstream's frame-folder files, sorted by name (hidden files skipped); `VideoError` when there are none."""
    names = sorted(
        entry.name for entry in os.scandir(folder) if entry.is_file() and not entry.name.startswith(".")
    )
    if not names:
        raise VideoError(
            f"{label} is a folder without frame files: put one image per frame in it, or pass a video"
        )
    return names


def _load_frame(path: Path, label: str) -> Image.Image:
    """One frame image as RGB, alpha dropped like upstream's ``convert("RGB")``."""
    try:
        return load_image(path, alpha="drop")
    except ImageError as exc:
        raise VideoError(f"{label}: frame {path.name!r} is unusable: {exc}") from exc


def import_av() -> Any:
    """The PyAV module (an optional extra), or a `VideoError` saying how to install it."""
    try:
        import av
    except ImportError as exc:
        raise VideoError(
            "reading videos needs PyAV: pip install 'llavakit[video]' (or pip install 'av>=12')"
        ) from exc
    return av


def _open(path: Path, label: str, guard: DecodeGuard | None) -> av.container.InputContainer:
    """Open the container, refusing undecodable files and still images (FFmpeg reads a PNG as a 1-frame video)."""
    av = import_av()
    guard = guard or DecodeGuard()
    try:
        container = av.open(str(path), mode="r", format=guard.demuxer, options=dict(guard.options))
    except av.FFmpegError as exc:
        raise VideoError(
            f"{label} cannot be opened as a video ({exc}): it is corrupt, truncated or not a video; re-download it "
            "or re-encode it (e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`)"
        ) from exc
    demuxer = container.format.name
    if demuxer == "image2" or demuxer.endswith("_pipe"):
        container.close()
        raise VideoError(f"{label} is a still image ({demuxer}), not a video: give it as an image instead")
    return container


def _video_stream(container: av.container.InputContainer, label: str) -> av.VideoStream:
    if not container.streams.video:
        kinds = ", ".join(stream.type for stream in container.streams) or "no streams"
        raise VideoError(f"{label} has no video stream (found {kinds}): pass a file with video")
    return container.streams.video[0]


def _average_rate(stream: av.VideoStream, label: str) -> float:
    """decord's ``get_avg_fps`` (``avg_frame_rate``); FFmpeg's guess where the container gives none."""
    rate = stream.average_rate or stream.guessed_rate
    if not rate or rate <= 0:
        raise VideoError(f"{label} has no usable frame rate in its headers: re-encode it with a fixed rate")
    return float(rate)


def _count_frames(
    container: av.container.InputContainer, stream: av.VideoStream, fps: float, label: str
) -> int:
    """Video packets found by demuxing (decord's frame count), checked against what the headers promise."""
    try:
        # PyAV ends the demux with an empty flush packet per stream; it holds no frame
        packets = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except import_av().FFmpegError as exc:
        raise VideoError(f"{label} is corrupt: demuxing failed ({exc}); re-download or re-encode it") from exc
    if packets == 0:
        raise VideoError(f"{label} has no video frames: re-encode it or remove the sample")
    if stream.frames > packets:
        raise VideoError(
            f"{label} is truncated or corrupt: its header lists {stream.frames} frames but only {packets} are in "
            "the file; re-download or re-encode it"
        )
    if stream.frames == 0 and len(container.streams) == 1 and container.duration:
        header_s, found_s = container.duration / 1e6, packets / fps
        if header_s - found_s > max(_TRUNCATION_MARGIN_S, _TRUNCATION_MARGIN_FRACTION * header_s):
            raise VideoError(
                f"{label} is truncated: its header says {header_s:.2f} s but its frames cover {found_s:.2f} s; "
                "re-download or re-encode it"
            )
    return packets


def _decode(
    container: av.container.InputContainer, wanted: set[int], total: int, label: str, guard: DecodeGuard | None
) -> dict[int, Image.Image]:
    """Decode frames in order up to the last wanted one, keeping only the wanted ones as RGB PIL images."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame-threaded decoding; frames still come out in order
    guard = guard or DecodeGuard()
    if guard.max_frame_pixels is not None:
        stream.codec_context.options = {**stream.codec_context.options, "max_pixels": str(guard.max_frame_pixels)}
    last, kept, index = max(wanted), {}, -1
    try:
        for index, frame in enumerate(container.decode(stream)):
            if guard.on_frame is not None:
                guard.on_frame(index, frame.width, frame.height)
            if index in wanted:
                kept[index] = frame.to_image()
            if index >= last:
                break
    except import_av().FFmpegError as exc:
        # FFmpeg reports a frame above max_pixels as invalid data, indistinguishable from damage
        cap = f", or a frame is above the limit of {guard.max_frame_pixels} pixels" if guard.max_frame_pixels else ""
        raise VideoError(
            f"{label} is corrupt{cap}: decoding failed after {index + 1} of {total} frames ({exc}); re-download or "
            "re-encode it"
        ) from exc
    if index < last:
        raise VideoError(
            f"{label} is truncated or corrupt: only {index + 1} of its {total} frames decode; re-download or "
            "re-encode it"
        )
    return kept


def process_frames(frames: list[Image.Image], image_spec: ImageSpec, video_spec: VideoSpec) -> torch.Tensor:
    """Preprocess sampled frames into one normalised tile each.

    Args:
        frames: RGB PIL images (`Video.frames`).
        image_spec: supplies ``tile_size`` S, ``resample`` and ``image_mean`` / ``image_std``.
        video_spec: supplies ``frame_view`` (``squash`` to S×S | ``crop`` shortest edge to S, centre S×S).

    Returns:
        ``FloatTensor [F, 3, S, S]``, F = ``len(frames)``.
    """
    if not frames:
        raise VideoError("process_frames got no frames: load_video returns at least one")
    for number, frame in enumerate(frames):
        if not isinstance(frame, Image.Image) or frame.mode != "RGB":
            found = frame.mode if isinstance(frame, Image.Image) else type(frame).__name__
            raise VideoError(
                f"process_frames: frame {number} is {found}, not an RGB PIL image: use load_video()"
            )
    return frame_tiles(frames, image_spec, video_spec.frame_view)


def time_instruction(video: Video | VideoProbe) -> str:
    """Upstream's ``add_time_instruction`` sentence (``llava/train/train.py``), kept verbatim including its missing
    space after ``{frame times}.``; times are ``f"{t:.2f}s"`` joined by commas. A `VideoProbe` gives the same
    sentence as the `Video` loaded with the same spec."""
    times = ",".join(f"{time:.2f}s" for time in video.frame_times)
    return (
        f"The video lasts for {video.duration:.2f} seconds, and {len(video.frame_times)} frames are uniformly sampled "
        f"from it. These frames are located at {times}.Please answer the following questions related to this "
        "video."
    )
