"""Video reading and frame preprocessing: a video file or frame folder becomes ``[F, 3, S, S]`` normalised frames.

`load_video` samples frames with upstream LLaVA-NeXT's rules (``llava/utils.py process_video_with_decord`` and the
``shareVideoGPTV`` frame-folder branch of ``llava/train/train.py LazySupervisedDataset._get_item``), decoding with
PyAV (its wheels bundle FFmpeg) instead of decord. Like decord, the frame count is the number of video packets
the demuxer finds (decord's ``len(VideoReader)`` is its packet index) and the rate is the stream's average frame
rate (``avg_frame_rate``); see `sample_indices`. Counting packets reads the file once without decoding, which is
cheap next to decoding, and is exact where container headers are missing (WebM/MKV store no frame count) or stale.

The same demux records each packet's presentation timestamp (pts) and keyframe flag (a `FrameIndex`): frame ``i``
is the ``i``-th smallest pts, which is the order the decoder outputs frames in, so the ``i``-th decoded frame of a
sequential pass (decord's frame ``i``) is the frame with that pts. Decoding then seeks, as decord does: the sampled
frames are split into runs wherever decoding on to the next run's keyframe would decode a whole GOP for nothing;
such a run starts with a seek to the keyframe at or before its first frame (``backward=True``, keyframes only) and
decodes forward, each decoded frame named by its pts and required to follow the previous one. A frame after a seek
depends only on frames from that keyframe on (closed GOPs; an open GOP's leading frames, which sit before the
keyframe in time, are decoded and dropped), so its pixels equal the sequential pass's. Sparse sampling
(``frames_upbound`` with ``force_sample``) thus decodes about one GOP per sampled frame instead of the whole video;
with GOPs longer than the gaps between sampled frames nothing is skipped and decoding stays sequential.

Where the timestamps cannot be trusted the file is decoded in one sequential pass, frames numbered by counting, and
an INFO log line says why (once per file): packets without a pts (raw elementary streams) or with repeated ones; a
seek that does not reach the keyframe's pts first, or reaches a frame the decoder does not call a keyframe (AVI's
demuxer seeks by decode time, so a keyframe's decode timestamp is tried after its pts); a decoded pts that no packet
has or that is out of order; an FFmpeg error after a seek (the sequential pass then reports it as today). Either
way only the sampled frames are kept as PIL images, so a long video never sits in memory.

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

import logging
import os
from collections.abc import Callable, Iterator, Mapping
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
_log = logging.getLogger(__name__)

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


@dataclass(frozen=True, eq=False)
class FrameIndex:
    """Where each frame of a video stream sits, from the probe's demux, so `load_video` can seek to sampled frames.

    Frame ``i`` is the packet with the ``i``-th smallest pts: the decoder outputs frames in pts order, so this is
    the frame a sequential pass counts as ``i`` (B-frames make the packets' own order differ).

    Attributes:
        pts: ``int64 [total_frames]``, frame ``i``'s presentation timestamp (stream time base), ascending.
        keyframes: ``int64 [K]``, ascending indices of the frames whose packets the container flags as keyframes.
        keyframe_dts: ``int64 [K]``, each keyframe packet's decode timestamp (its pts where the packet has none).
        problem: why the timestamps cannot number the frames (a packet without a pts, two with the same), else
            None; the arrays are then empty and `load_video` decodes sequentially.
    """

    pts: np.ndarray
    keyframes: np.ndarray
    keyframe_dts: np.ndarray
    problem: str | None = None

    @classmethod
    def from_packets(cls, packets: list[tuple[int | None, int | None, bool]]) -> FrameIndex:
        """From each video packet's ``(pts, dts, is_keyframe)``, in demux order."""
        empty = np.zeros(0, dtype=np.int64)
        if any(pts is None for pts, _, _ in packets):
            return cls(empty, empty, empty, "a packet has no presentation timestamp")
        ordered = sorted(packets, key=lambda packet: packet[0])
        pts = np.array([packet[0] for packet in ordered], dtype=np.int64)
        if np.any(np.diff(pts) <= 0):
            return cls(empty, empty, empty, "two packets share a presentation timestamp")
        keyframes = np.array([i for i, packet in enumerate(ordered) if packet[2]], dtype=np.int64)
        dts = [ordered[i][1] if ordered[i][1] is not None else ordered[i][0] for i in keyframes]
        return cls(pts, keyframes, np.array(dts, dtype=np.int64))

    def position(self, pts: int | None) -> int | None:
        """The index of the frame with this pts, or None when no packet has it."""
        if pts is None:
            return None
        found = int(np.searchsorted(self.pts, pts))
        return found if found < len(self.pts) and self.pts[found] == pts else None

    def keyframe_at_or_before(self, frame: int) -> int:
        """The index of the last keyframe at or before frame ``frame`` in time, -1 when there is none."""
        found = int(np.searchsorted(self.keyframes, frame, side="right")) - 1
        return int(self.keyframes[found]) if found >= 0 else -1

    def seek_timestamps(self, keyframe: int) -> tuple[int, int]:
        """``(pts, dts)`` of keyframe ``keyframe`` (a frame index): what demuxers seek by (MP4, Matroska: pts; AVI:
        dts)."""
        found = int(np.searchsorted(self.keyframes, keyframe))
        return int(self.pts[keyframe]), int(self.keyframe_dts[found])


@dataclass(frozen=True)
class VideoProbe:
    """What `load_video` would sample, known without decoding a frame (see `probe_video`).

    Attributes:
        frame_indices: each frame to sample, as an index among the ``total_frames``.
        frame_times: each sampled frame's time in seconds (``index / source_fps``).
        duration: the video's length in seconds (``total_frames / source_fps``).
        source_fps: the stream's average frame rate (2 for frame folders).
        total_frames: frames in the video (video packets; files in a frame folder).
        frame_index: where each frame of a video file sits, for `load_video` to seek (None: a frame folder, or a
            probe made by hand; such a file is decoded sequentially).
    """

    frame_indices: list[int]
    frame_times: list[float]
    duration: float
    source_fps: float
    total_frames: int
    frame_index: FrameIndex | None = field(default=None, compare=False, repr=False)

    @property
    def num_frames(self) -> int:
        """Frames `load_video` returns (a repeated index counts each time)."""
        return len(self.frame_indices)


def probe_video(source: VideoSource, spec: VideoSpec, guard: DecodeGuard | None = None) -> VideoProbe:
    """The frames `load_video` samples from ``source`` and their times, without decoding: a file is demuxed once
    (its packets counted and their timestamps recorded, opened as ``guard`` says), a frame folder only listed.
    Passing the probe to `load_video` spares it a second demux.

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
        total, index = _count_frames(container, stream, fps, label)
    return _probe(sample_indices(total, fps, spec), fps, total, index)


def _probe(indices: list[int], fps: float, total: int, index: FrameIndex | None = None) -> VideoProbe:
    return VideoProbe(indices, [i / fps for i in indices], total / fps, fps, total, index)


def load_video(
    source: VideoSource, spec: VideoSpec, guard: DecodeGuard | None = None, probe: VideoProbe | None = None
) -> Video:
    """Sample and decode the frames of a local video file or a folder of frame images.

    Args:
        source: a video file PyAV (FFmpeg) can read (mp4, webm, mkv, avi, mov, gif, ...) or a folder of frame
            images (upstream's ``shareVideoGPTV`` layout, one image file per frame, named in time order).
        spec: the sampling settings (``video_fps``, ``frames_upbound``, ``force_sample``).
        guard: limits for an untrusted file (see `DecodeGuard`); whatever its ``on_frame`` raises propagates.
        probe: `probe_video(source, spec, guard)` when the caller already has it (saves a demux of the file);
            None: probed here.

    Returns:
        The `Video` with the sampled frames, their times, and the video's length, rate and frame count.

    Raises:
        VideoError: the source is a URL, missing, an image, corrupt, truncated, or has no frames; ``probe``
            samples other frames than ``spec`` does.
    """
    path, label = _local_source(source)
    if probe is None:
        probe = probe_video(source, spec, guard)
    else:
        _check_probe(probe, spec, path.is_dir(), label)
    if path.is_dir():
        names = _frame_names(path, label)
        decoded = {index: _load_frame(path / names[index], label) for index in set(probe.frame_indices)}
    else:
        decoded = _decode_file(path, label, guard or DecodeGuard(), probe)
    return Video(
        frames=[decoded[index] for index in probe.frame_indices],
        frame_times=probe.frame_times,
        duration=probe.duration,
        source_fps=probe.source_fps,
        total_frames=probe.total_frames,
        frame_indices=probe.frame_indices,
    )


def _check_probe(probe: VideoProbe, spec: VideoSpec, folder: bool, label: str) -> None:
    """A probe given to `load_video` must sample what ``spec`` samples from the same frame count and rate."""
    total = probe.total_frames
    expected = folder_indices(total, spec) if folder else sample_indices(total, probe.source_fps, spec)
    if probe.frame_indices != expected:
        raise VideoError(
            f"{label}: the probe given to load_video samples frames {probe.frame_indices}, but the spec "
            f"samples {expected}: probe it with the same spec (probe_video(source, spec)) or pass no probe"
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
) -> tuple[int, FrameIndex]:
    """Video packets found by demuxing (decord's frame count), checked against what the headers promise, and the
    `FrameIndex` their timestamps give."""
    try:
        # PyAV ends the demux with an empty flush packet per stream; it holds no frame
        found = [
            (packet.pts, packet.dts, packet.is_keyframe)
            for packet in container.demux(stream)
            if packet.size > 0
        ]
    except import_av().FFmpegError as exc:
        raise VideoError(f"{label} is corrupt: demuxing failed ({exc}); re-download or re-encode it") from exc
    packets = len(found)
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
    return packets, FrameIndex.from_packets(found)


class _Reporter:
    """Runs ``guard.on_frame`` once per decoded frame index: after a fallback the sequential pass decodes again
    frames the seeking pass decoded, and a budget summed over sampled frames must not count them twice."""

    def __init__(self, on_frame: Callable[[int, int, int], None] | None) -> None:
        self.on_frame, self.reported = on_frame, set[int]()

    def __call__(self, index: int, frame: av.VideoFrame) -> None:
        if self.on_frame is not None and index not in self.reported:
            self.reported.add(index)
            self.on_frame(index, frame.width, frame.height)


class _SeekFailed(Exception):
    """The file's timestamps or seeks cannot be trusted to name frames: decode it sequentially instead."""


def _decode_file(path: Path, label: str, guard: DecodeGuard, probe: VideoProbe) -> dict[int, Image.Image]:
    """The sampled frames of a video file: seeking where the plan skips a GOP or more, else (or where seeking
    fails) one sequential pass."""
    wanted, report, index = set(probe.frame_indices), _Reporter(guard.on_frame), probe.frame_index
    problem = index.problem if index is not None else None
    if index is not None and problem is None:
        plan = _plan(index, sorted(wanted))
        if any(seek_to is not None for seek_to, _ in plan):
            try:
                with _open(path, label, guard) as container:
                    return _SeekingDecoder(container, guard, index, report).decode(plan, wanted)
            except _SeekFailed as exc:
                problem = str(exc)
    if problem is not None:
        _log.info(
            "%s: decoding every frame up to the last sampled one instead of seeking: %s", label, problem
        )
    with _open(path, label, guard) as container:
        return _decode(container, wanted, probe.total_frames, label, guard, report)


def _plan(index: FrameIndex, wanted: list[int]) -> list[tuple[int | None, int]]:
    """The sampled frames (ascending, unique) as runs decoded without a seek: ``(keyframe to seek to first, or None
    to decode on from where the decoder stands, last frame of the run)``. A run starts with a seek when decoding on
    to its first frame's keyframe would decode a whole GOP for nothing (another keyframe lies before that one)."""
    runs: list[tuple[int | None, int]] = []
    next_frame = 0
    for frame in wanted:
        keyframe = index.keyframe_at_or_before(frame)
        if keyframe > next_frame and index.keyframe_at_or_before(keyframe - 1) >= next_frame:
            runs.append((keyframe, frame))
        elif runs:
            runs[-1] = (runs[-1][0], frame)
        else:
            runs.append((None, frame))
        next_frame = frame + 1
    return runs


class _SeekingDecoder:
    """Decodes a `_plan`'s runs, naming each decoded frame by its pts; `_SeekFailed` where that is not possible."""

    def __init__(
        self, container: av.container.InputContainer, guard: DecodeGuard, index: FrameIndex, report: _Reporter
    ) -> None:
        self.container, self.index, self.report = container, index, report
        self.stream = _decode_stream(container, guard)
        # the demuxer seeks by decode time (AVI): learned from the first seek that needs it
        self.by_dts = False

    def decode(self, plan: list[tuple[int | None, int]], wanted: set[int]) -> dict[int, Image.Image]:
        """The ``wanted`` frames as RGB PIL images, decoding the runs of ``plan`` in order."""
        kept: dict[int, Image.Image] = {}
        try:
            frames, expected = self._numbered(self.container.decode(self.stream)), 0
            for seek_to, last in plan:
                if seek_to is not None:
                    frames, expected = self._seek(seek_to), seek_to
                for index, frame in frames:
                    if index != expected:
                        raise _SeekFailed(f"frame {index} was decoded where frame {expected} was due")
                    self.report(index, frame)
                    if index in wanted:
                        kept[index] = frame.to_image()
                    expected += 1
                    if index == last:
                        break
                else:
                    raise _SeekFailed(f"the stream ended before frame {last}")
        except import_av().FFmpegError as exc:
            raise _SeekFailed(f"FFmpeg failed while seeking and decoding ({exc})") from exc
        return kept

    def _numbered(self, frames: Iterator[av.VideoFrame]) -> Iterator[tuple[int, av.VideoFrame]]:
        """``(frame index, frame)`` for decoded frames, the index found from the frame's pts."""
        for frame in frames:
            index = self.index.position(frame.pts)
            if index is None:
                raise _SeekFailed(f"a decoded frame has pts {frame.pts}, which no packet has")
            yield index, frame

    def _seek(self, keyframe: int) -> Iterator[tuple[int, av.VideoFrame]]:
        """Numbered frames from frame ``keyframe`` on, after seeking by its pts (or its dts, for demuxers that seek
        by decode time); frames decoded before it (an open GOP's leading frames) are reported and dropped."""
        pts, dts = self.index.seek_timestamps(keyframe)
        landed: int | None = None
        for timestamp in dict.fromkeys((dts, pts) if self.by_dts else (pts, dts)):  # distinct, in order
            self.container.seek(timestamp, stream=self.stream, backward=True, any_frame=False)
            frames = self._numbered(self.container.decode(self.stream))
            landed, frame = self._first_from(frames, keyframe)
            if landed == keyframe and frame.key_frame:  # the decoder's word: container flags can be wrong
                self.by_dts = timestamp != pts
                return _chain((landed, frame), frames)
            if frame is not None:
                self.report(landed, frame)
        raise _SeekFailed(f"a seek to keyframe {keyframe} landed on frame {landed}, or it is not a keyframe")

    def _first_from(
        self, frames: Iterator[tuple[int, av.VideoFrame]], keyframe: int
    ) -> tuple[int | None, av.VideoFrame | None]:
        """The first numbered frame at or after frame ``keyframe``; earlier ones are reported and dropped."""
        for index, frame in frames:
            if index >= keyframe:
                return index, frame
            self.report(index, frame)
        return None, None


def _chain(first: tuple[int, av.VideoFrame], rest: Iterator[tuple[int, av.VideoFrame]]) -> Iterator:
    """``first``, then ``rest``: the frame that confirmed a seek goes back in front of the frames after it."""
    yield first
    yield from rest


def _decode_stream(container: av.container.InputContainer, guard: DecodeGuard) -> av.VideoStream:
    """The video stream, set up to decode: frame threads, and the guard's pixel cap."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame-threaded decoding; frames still come out in order
    if guard.max_frame_pixels is not None:
        stream.codec_context.options = {**stream.codec_context.options, "max_pixels": str(guard.max_frame_pixels)}
    return stream


def _decode(
    container: av.container.InputContainer,
    wanted: set[int],
    total: int,
    label: str,
    guard: DecodeGuard,
    report: _Reporter,
) -> dict[int, Image.Image]:
    """Decode frames in order up to the last wanted one, keeping only the wanted ones as RGB PIL images; frames are
    numbered by counting."""
    stream = _decode_stream(container, guard)
    last, kept, index = max(wanted), {}, -1
    try:
        for index, frame in enumerate(container.decode(stream)):
            report(index, frame)
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
