"""`load_video` seeks to the sampled frames instead of decoding every frame before them (`llavakit.anyres.video`).

The oracle is a plain PyAV sequential decode written here (every frame, numbered by counting, as decord and the old
`load_video` number them): the frames `load_video` returns must be numpy-equal to the oracle's frames at the sampled
indices, over several GOP / B-frame structures (H.264 in MP4 and MKV, open GOPs, VP8 and VP9 in WebM, MPEG-4 in AVI)
and sampling settings. Every frame carries noise, so no two frames are equal and a frame off by one is caught.
Seeking is checked to happen (frames decoded, counted with the `DecodeGuard.on_frame` hook, far below the total for
sparse sampling; no fallback logged), and the fallback to a sequential pass is checked on crafted cases: a container
whose seeks land a few GOPs late, and a raw H.264 stream without timestamps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from llavakit.anyres.video import DecodeGuard, Video, load_video, probe_video
from llavakit.anyres.video_spec import VideoSpec
from llavakit.errors import VideoError

av = pytest.importorskip("av")

from video_helpers import encode_video  # noqa: E402  (after the skip: it needs av)

FRAMES = 300
LOGGER = "llavakit.anyres.video"

# (file name, codec, rate, encoder options): the GOP / B-frame structures decoded with seeks
STRUCTURES = {
    "mp4-g5-bf2": ("clip.mp4", "libx264", 30, {"g": "5", "bf": "2"}),
    "mp4-g30-no-b": ("clip.mp4", "libx264", 30, {"g": "30", "bf": "0"}),
    "mp4-open-gop": (
        "clip.mp4",
        "libx264",
        30,
        {"bf": "3", "x264-params": "keyint=12:min-keyint=12:open-gop=1"},
    ),
    "mkv-h264-g7-bf3": ("clip.mkv", "libx264", 30, {"g": "7", "bf": "3"}),
    "webm-vp8-g8": ("clip.webm", "libvpx", 30, {"g": "8"}),
    "webm-vp9-g10-ntsc": ("clip.webm", "libvpx-vp9", Fraction(30000, 1001), {"g": "10"}),
    "avi-mpeg4-g6-bf2": ("clip.avi", "mpeg4", 30, {"g": "6", "bf": "2"}),
    "avi-mpeg4-g10": ("clip.avi", "mpeg4", 30, {"g": "10"}),
}

SETTINGS = [
    VideoSpec(video_fps=1, frames_upbound=32),  # stride 30: 10 frames
    VideoSpec(video_fps=2, frames_upbound=0),  # stride 15, no bound
    VideoSpec(video_fps=10, frames_upbound=5),  # over the bound: linspace
    VideoSpec(video_fps=1, frames_upbound=8, force_sample=True),
    VideoSpec(video_fps=1, frames_upbound=32, force_sample=True),  # LLaVA-Video's setting
    VideoSpec(video_fps=1, frames_upbound=1, force_sample=True),  # frame 0 only
    VideoSpec(video_fps=1, frames_upbound=400, force_sample=True),  # more than the frames: repeats
    VideoSpec(video_fps=15, frames_upbound=0),  # stride 2: dense, decoded on without seeking
]


def _sequential(path: Path) -> list[np.ndarray]:
    """Every frame of the file in decode-output order (the frame numbering under test), as RGB arrays."""
    with av.open(str(path)) as container:
        return [np.asarray(frame.to_image()) for frame in container.decode(container.streams.video[0])]


def _max_keyframe_gap(path: Path) -> int:
    """The most frames from one keyframe to the next (or the end), in presentation order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = sorted((p.pts, p.is_keyframe) for p in container.demux(stream) if p.size)
    keys = [index for index, (_, key) in enumerate(packets) if key] + [len(packets)]
    return max(b - a for a, b in zip(keys, keys[1:]))


def _counting_guard() -> tuple[DecodeGuard, list[int]]:
    """A guard whose ``on_frame`` records each decoded frame's index."""
    seen: list[int] = []
    return DecodeGuard(on_frame=lambda index, width, height: seen.append(index)), seen


def _assert_frames(video: Video, oracle: list[np.ndarray]) -> None:
    assert len(video.frames) == len(video.frame_indices)
    for index, frame in zip(video.frame_indices, video.frames):
        assert np.array_equal(np.asarray(frame), oracle[index]), (
            f"frame {index} differs from the sequential decode"
        )


def _fallbacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == LOGGER and record.levelno == logging.INFO]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, tuple[Path, list[np.ndarray]]]:
    """Each structure's 300-frame clip and its sequential decode."""
    clips = {}
    for name, (file, codec, rate, options) in STRUCTURES.items():
        path = encode_video(tmp_path_factory.mktemp(name) / file, FRAMES, rate, codec, True, options)
        clips[name] = (path, _sequential(path))
    return clips


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_seeking_gives_the_sequential_frames(clips, name, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path, oracle = clips[name]
    assert len(oracle) == FRAMES
    for spec in SETTINGS:
        guard, seen = _counting_guard()
        video = load_video(path, spec, guard)
        assert video.total_frames == FRAMES
        _assert_frames(video, oracle)
        assert len(seen) == len(set(seen)), "a frame was reported to on_frame twice"
        assert set(video.frame_indices) <= set(seen)
    assert _fallbacks(caplog) == [], "these files seek without falling back"


@pytest.mark.parametrize("name", ["mp4-g5-bf2", "mkv-h264-g7-bf3", "webm-vp9-g10-ntsc", "avi-mpeg4-g6-bf2"])
def test_sparse_sampling_decodes_about_one_gop_per_frame(clips, name):
    path, oracle = clips[name]
    spec = VideoSpec(frames_upbound=8, force_sample=True)
    guard, seen = _counting_guard()
    video = load_video(path, spec, guard)
    _assert_frames(video, oracle)
    assert video.frame_indices[-1] == FRAMES - 1  # a sequential pass would decode all 300 frames
    # each sampled frame costs at most the frames from its keyframe, plus one frame per seek where a demuxer
    # seeks by decode time (AVI) and the pts seek is tried first
    assert len(seen) <= len(video.frame_indices) * (_max_keyframe_gap(path) + 1)
    assert len(seen) < FRAMES / 3


class _SeeksOff:
    """An `av` container whose seeks go ``shift`` time-base units away from the timestamp asked for."""

    def __init__(self, container, shift: int) -> None:
        self._container, self._shift = container, shift

    def seek(self, offset: int, **kwargs) -> None:
        self._container.seek(offset + self._shift, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._container, name)

    def __enter__(self) -> _SeeksOff:
        return self

    def __exit__(self, *exc_info) -> None:
        self._container.close()


def _shift_seeks(monkeypatch: pytest.MonkeyPatch, frames: int) -> Callable[[], int]:
    """Make every seek land ``frames`` frames off (at 30 fps); returns a counter of the files opened."""
    real_open, opened = av.open, []

    def shifted_open(*args, **kwargs):
        container = real_open(*args, **kwargs)
        opened.append(container)
        stream = container.streams.video[0]
        return _SeeksOff(container, round(frames / (30 * stream.time_base)))

    monkeypatch.setattr(av, "open", shifted_open)
    return lambda: len(opened)


@pytest.mark.parametrize("name", ["mp4-g5-bf2", "webm-vp8-g8", "avi-mpeg4-g10"])
def test_a_seek_landing_late_falls_back_to_the_sequential_pass(clips, name, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path, oracle = clips[name]
    spec = VideoSpec(frames_upbound=8, force_sample=True)
    probe = probe_video(path, spec)
    opened = _shift_seeks(monkeypatch, 40)
    guard, seen = _counting_guard()
    video = load_video(path, spec, guard, probe=probe)
    _assert_frames(video, oracle)
    assert opened() == 2  # the seeking pass, then the sequential one
    [record] = _fallbacks(caplog)
    assert str(path) in record.getMessage() and "instead of seeking" in record.getMessage()
    assert sorted(seen) == list(range(FRAMES)), "the fallback decodes, and reports once, every frame"


def test_a_seek_landing_early_still_gives_the_right_frames(clips, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path, oracle = clips["mkv-h264-g7-bf3"]
    spec = VideoSpec(frames_upbound=6, force_sample=True)
    _shift_seeks(monkeypatch, -20)  # an earlier keyframe: decoded forward, frames before the target dropped
    guard, seen = _counting_guard()
    _assert_frames(load_video(path, spec, guard), oracle)
    assert _fallbacks(caplog) == []
    assert len(seen) < FRAMES


def test_a_stream_without_timestamps_is_decoded_sequentially(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = encode_video(tmp_path / "raw.h264", 60, 30, noise=True, codec_options={"g": "5", "bf": "2"})
    with av.open(str(path)) as container:  # the crafted case: an elementary stream's packets carry no pts
        assert all(p.pts is None for p in container.demux(container.streams.video[0]) if p.size)
    video = load_video(path, VideoSpec(frames_upbound=4, force_sample=True))
    _assert_frames(video, _sequential(path))
    [record] = _fallbacks(caplog)
    assert "no presentation timestamp" in record.getMessage()


def test_a_given_probe_spares_the_second_demux(clips, monkeypatch):
    path, oracle = clips["webm-vp8-g8"]
    spec = VideoSpec(frames_upbound=8, force_sample=True)
    probe = probe_video(path, spec)
    real_open, opened = av.open, []
    monkeypatch.setattr(av, "open", lambda *args, **kwargs: opened.append(args) or real_open(*args, **kwargs))
    _assert_frames(load_video(path, spec, probe=probe), oracle)
    assert len(opened) == 1
    _assert_frames(load_video(path, spec), oracle)
    assert len(opened) == 3  # probed, then decoded
    with pytest.raises(VideoError, match="probe it with the same spec"):
        load_video(path, VideoSpec(frames_upbound=4, force_sample=True), probe=probe)


def test_on_frame_errors_propagate_from_the_seeking_pass(clips, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path, _ = clips["mp4-g30-no-b"]

    class Deadline(Exception):
        pass

    def on_frame(index: int, width: int, height: int) -> None:
        if index >= 150:
            raise Deadline(f"frame {index}")

    with pytest.raises(Deadline, match="frame 1[5-9][0-9]"):
        load_video(path, VideoSpec(frames_upbound=8, force_sample=True), DecodeGuard(on_frame=on_frame))
    assert _fallbacks(caplog) == []  # the guard's error ends the load; it is no reason to decode again
