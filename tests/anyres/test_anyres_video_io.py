"""Video reading and frame preprocessing (`llavakit.anyres.video`) against upstream LLaVA-NeXT's rules and
transformers' processors.

The videos are encoded here with PyAV (H.264 MP4, VP9 WebM, MPEG-4 AVI, FFV1 MKV): frame ``i`` is one solid colour
from a palette whose channels sit 64 levels apart, so a decoded frame's index is recovered exactly despite codec
loss. Sampling is checked against upstream's ``process_video_with_decord`` rule and its frame-folder rule, computed
here independently from the rate and frame count PyAV reports; preprocessing against ``SiglipImageProcessorPil``
(squash) and ``CLIPImageProcessorPil`` (crop) on the same PIL frames.
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llavakit.anyres.spec import ImageSpec
from llavakit.anyres.video import load_video, process_frames, time_instruction
from llavakit.anyres.video_spec import VideoSpec
from llavakit.errors import ImageError, VideoError

av = pytest.importorskip("av")

from video_helpers import LEVELS, SIDE, encode_video  # noqa: E402  (after the skip: it needs av)
from video_helpers import colour as _colour  # noqa: E402


def _index_of(frame: Image.Image) -> int:
    """The palette index nearest to the frame's mean colour (codec loss is a few levels, the palette 64 apart)."""
    mean = np.asarray(frame, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    digits = [int(np.argmin([abs(value - level) for level in LEVELS])) for value in mean]
    return digits[0] * 16 + digits[1] * 4 + digits[2]


def upstream_sampling(total: int, fps: float, spec: VideoSpec) -> list[int]:
    """Upstream ``process_video_with_decord``, restated: stride ``round(fps / video_fps)``; the linspace bound."""
    stride = max(
        1, round(fps / spec.video_fps)
    )  # upstream's range() raises on a 0 stride; llavakit takes all
    chosen = [frame for frame in range(total) if frame % stride == 0]
    too_many = spec.frames_upbound > 0 and len(chosen) > spec.frames_upbound
    if too_many or (spec.frames_upbound > 0 and spec.force_sample):
        chosen = [int(x) for x in np.floor(np.linspace(0.0, total - 1.0, spec.frames_upbound))]
    return chosen


def _stream_facts(path: Path) -> tuple[int, float]:
    """(frames, average rate) as PyAV's demuxer reports them, read independently of the code under test."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = sum(1 for packet in container.demux(stream) if packet.size)
        return packets, float(stream.average_rate)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Synthetic videos: 30 frames at 10 fps (MP4, AVI), 40 at 29.97 fps (WebM: no frame count in its header)."""
    folder = tmp_path_factory.mktemp("videos")
    return {
        "mp4": encode_video(folder / "ten.mp4", 30, 10),
        "avi": encode_video(
            folder / "ten.avi",
            30,
            10,
            codec="mpeg4",
        ),
        "webm": encode_video(folder / "ntsc.webm", 40, Fraction(30000, 1001), codec="libvpx-vp9"),
    }


SETTINGS = [
    VideoSpec(video_fps=1, frames_upbound=32),  # stride path, under the bound
    VideoSpec(video_fps=2, frames_upbound=0),  # no bound
    VideoSpec(video_fps=3, frames_upbound=0),  # stride round(3.33) = 3
    VideoSpec(video_fps=4, frames_upbound=0),  # stride round(2.5) = 2: half to even
    VideoSpec(video_fps=10, frames_upbound=8),  # over the bound: linspace
    VideoSpec(video_fps=1, frames_upbound=4, force_sample=True),
    VideoSpec(video_fps=1, frames_upbound=45, force_sample=True),  # more than the frames: repeats
    VideoSpec(video_fps=25, frames_upbound=0),  # faster than the video: every frame
]


@pytest.mark.parametrize("kind", ["mp4", "avi", "webm"])
@pytest.mark.parametrize(
    "spec", SETTINGS, ids=lambda s: f"fps{s.video_fps}-up{s.frames_upbound}-f{s.force_sample}"
)
def test_sampling_follows_upstream(videos, kind, spec):
    total, fps = _stream_facts(videos[kind])
    video = load_video(videos[kind], spec)
    expected = upstream_sampling(total, fps, spec)
    assert video.frame_indices == expected
    assert [_index_of(frame) for frame in video.frames] == expected  # the decoded frames are the sampled ones
    assert video.frame_times == pytest.approx([index / fps for index in expected], abs=1e-12)
    assert (video.total_frames, video.source_fps) == (total, pytest.approx(fps))
    assert video.duration == pytest.approx(total / fps)
    assert all(frame.mode == "RGB" and frame.size == (SIDE, SIDE) for frame in video.frames)


def test_known_counts_and_rates(videos):
    """The facts the sampling rests on: the encoded frame counts and rates come back (header-less WebM too)."""
    assert [(load_video(videos[k], VideoSpec()).total_frames) for k in ("mp4", "avi", "webm")] == [30, 30, 40]
    assert load_video(videos["webm"], VideoSpec()).source_fps == pytest.approx(30000 / 1001, rel=1e-3)
    assert load_video(videos["mp4"], VideoSpec(video_fps=1)).frame_indices == [0, 10, 20]


def _write_folder(folder: Path, names: list[str]) -> Path:
    """One PNG per name, frame i (in the given order) coloured ``_colour(i)``."""
    folder.mkdir()
    for index, name in enumerate(names):
        Image.new("RGB", (SIDE, SIDE), _colour(index)).save(folder / name)
    return folder


@pytest.mark.parametrize(
    "spec, count",
    [(VideoSpec(), 10), (VideoSpec(frames_upbound=4, force_sample=True), 4), (VideoSpec(video_fps=5), 10)],
)
def test_frame_folder_follows_upstream(tmp_path, spec, count):
    folder = _write_folder(tmp_path / "shareVideoGPTV_clip", [f"frame_{i:03d}.png" for i in range(25)])
    (folder / ".DS_Store").write_bytes(b"\x00\x01")  # hidden files are no frames
    video = load_video(folder, spec)
    expected = [int(x) for x in np.floor(np.linspace(0.0, 24.0, count))]
    assert video.frame_indices == expected
    assert [_index_of(frame) for frame in video.frames] == expected
    assert video.frame_times == [index / 2 for index in expected]
    assert (video.duration, video.source_fps, video.total_frames) == (12.5, 2.0, 25)


def test_frame_folder_sorts_by_name(tmp_path):
    """Upstream sorts the file names as strings: frame_10 comes before frame_2."""
    names = [f"frame_{i}.png" for i in range(12)]
    folder = _write_folder(tmp_path / "frames", names)
    video = load_video(folder, VideoSpec(frames_upbound=12, force_sample=True))
    assert [names[_index_of(frame)] for frame in video.frames] == sorted(names)


def test_frame_folder_with_few_frames_repeats(tmp_path):
    folder = _write_folder(tmp_path / "frames", [f"{i}.png" for i in range(3)])
    video = load_video(folder, VideoSpec())
    assert video.frame_indices == [0, 0, 0, 0, 0, 1, 1, 1, 1, 2]  # linspace(0, 2, 10) floored
    assert [_index_of(frame) for frame in video.frames] == video.frame_indices


def _truncate(path: Path, out: Path, keep: float) -> Path:
    """The first ``keep`` fraction of the file's bytes, as a download cut short leaves it."""
    data = path.read_bytes()
    out.write_bytes(data[: int(len(data) * keep)])
    return out


def _corrupt_payload(path: Path) -> Path:
    """Scramble the first half of frame 15's data (its frame header included), leaving the container intact:
    only decoding can notice (damage past the header FFmpeg's decoders conceal silently, as decord does)."""
    with av.open(str(path)) as container:
        payload = bytes([packet for packet in container.demux(video=0) if packet.size][15])
    data = bytearray(path.read_bytes())
    start, end = data.find(payload), data.find(payload) + len(payload) // 2
    data[start:end] = bytes(value ^ 0x5A for value in data[start:end])
    path.write_bytes(bytes(data))
    return path


def _folder_input(tmp_path: Path, case: str) -> tuple[object, str]:
    """(source, a phrase the error must contain) for unusable paths and folders."""
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / ".hidden").write_bytes(b"x")
        return tmp_path / "empty", "without frame files"
    if case == "folder with a non-image":
        folder = _write_folder(tmp_path / "frames", ["a.png"])
        (folder / "b.txt").write_text("not a frame")
        return folder, "frame 'b.txt' is unusable"
    if case in ("png", "jpg"):
        Image.new("RGB", (SIDE, SIDE), (1, 2, 3)).save(tmp_path / f"still.{case}")
        return tmp_path / f"still.{case}", "is a still image"
    sources = {
        "missing": (tmp_path / "nope.mp4", "does not exist"),
        "url": ("https://example.com/clip.mp4", "is a URL"),
        "bytes": (b"\x00\x00", "pass a file or folder path"),
    }
    return sources[case]


def _broken_video(tmp_path: Path, case: str) -> tuple[Path, str]:
    """(file, a phrase the error must contain) for unusable video files."""
    if case in ("random bytes", "empty file"):
        (tmp_path / "junk.mp4").write_bytes(bytes(range(256)) * 8 if case == "random bytes" else b"")
        return tmp_path / "junk.mp4", "cannot be opened as a video"
    if case == "corrupt frames":
        return _corrupt_payload(
            encode_video(tmp_path / "a.mkv", 30, 10, codec="ffv1", noise=True)
        ), "decoding failed"
    if case == "zero frames":
        return encode_video(tmp_path / "zero.avi", 0, 10, codec="mpeg4"), "has no video frames"
    # truncated files: (name, encoder options, fraction kept, phrase); the AVI's header fills half the file
    name, options, keep, phrase = {
        "truncated mp4 (index at the end)": ("a.mp4", {}, 0.5, "cannot be opened"),
        "truncated mp4 (index first)": ("a.mp4", {"movflags": "faststart"}, 0.5, "header lists 30 frames"),
        "truncated avi": ("a.avi", {"codec": "mpeg4"}, 0.8, "header lists 30 frames"),
        "truncated webm": ("a.webm", {"codec": "libvpx-vp9"}, 0.5, "is truncated: its header says 3.00 s"),
    }[case]
    source = encode_video(tmp_path / name, 30, 10, noise=True, **options)
    return _truncate(source, tmp_path / f"cut_{name}", keep), phrase


PATH_CASES = ["missing", "url", "bytes", "empty folder", "folder with a non-image", "png", "jpg"]
FILE_CASES = [
    "random bytes",
    "empty file",
    "truncated mp4 (index at the end)",
    "truncated mp4 (index first)",
    "truncated avi",
    "truncated webm",
    "corrupt frames",
    "zero frames",
]


@pytest.mark.parametrize("case", PATH_CASES + FILE_CASES)
def test_bad_inputs_fail_loudly(tmp_path, case):
    build = _folder_input if case in PATH_CASES else _broken_video
    source, phrase = build(tmp_path, case)
    with pytest.raises(VideoError, match="^video |cannot load a video") as caught:
        load_video(source, VideoSpec())
    assert phrase in str(caught.value)
    assert isinstance(caught.value, ImageError)  # existing handlers of unusable images catch it too


def test_missing_pyav_says_how_to_install(videos, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(VideoError, match=r"llavakit\[video\]"):
        load_video(videos["mp4"], VideoSpec())


def _random_frames(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """Noisy RGB frames of the given (width, height) sizes: noise makes resampling differences visible."""
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


FRAME_SIZES = [(64, 64), (96, 40), (40, 96), (20, 13), (129, 70)]


@pytest.mark.parametrize("resample", ["bicubic", "bilinear"])
def test_squash_matches_siglip_processor(siglip_spec, resample):
    from transformers import SiglipImageProcessorPil
    from transformers.image_utils import PILImageResampling

    spec = (
        ImageSpec(**{**siglip_spec.to_dict(), "resample": resample}) if resample != "bicubic" else siglip_spec
    )
    frames = _random_frames(FRAME_SIZES)
    oracle = SiglipImageProcessorPil(
        size={"height": spec.tile_size, "width": spec.tile_size},
        resample=PILImageResampling[resample.upper()],
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
    )
    expected = oracle(frames, return_tensors="pt")["pixel_values"]
    got = process_frames(frames, spec, VideoSpec(frame_view="squash"))
    assert got.shape == (len(frames), 3, spec.tile_size, spec.tile_size) and got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_crop_matches_clip_processor(clip_spec):
    from transformers import CLIPImageProcessorPil

    frames = _random_frames(FRAME_SIZES)
    oracle = CLIPImageProcessorPil(
        size={"shortest_edge": clip_spec.tile_size},
        crop_size={"height": clip_spec.tile_size, "width": clip_spec.tile_size},
        image_mean=list(clip_spec.image_mean),
        image_std=list(clip_spec.image_std),
    )
    expected = oracle(frames, return_tensors="pt")["pixel_values"]
    got = process_frames(frames, clip_spec, VideoSpec(frame_view="crop"))
    assert got.shape == (len(frames), 3, clip_spec.tile_size, clip_spec.tile_size)
    assert torch.equal(got, expected)


def test_decoded_frames_through_the_processor(videos, siglip_spec):
    """End to end: decoded frames keep their order and colours through preprocessing (squash of a solid frame)."""
    video = load_video(videos["mp4"], VideoSpec(frames_upbound=5, force_sample=True))
    pixels = process_frames(video.frames, siglip_spec, VideoSpec())
    restored = ((pixels * 0.5 + 0.5) * 255).mean(dim=(2, 3)).numpy()
    nearest = [[int(np.argmin([abs(v - level) for level in LEVELS])) for v in frame] for frame in restored]
    assert [d[0] * 16 + d[1] * 4 + d[2] for d in nearest] == video.frame_indices


@pytest.mark.parametrize("frames", [[], ["not an image"], [Image.new("L", (8, 8))]])
def test_process_frames_refuses_bad_frames(clip_spec, frames):
    with pytest.raises(VideoError, match="process_frames"):
        process_frames(frames, clip_spec, VideoSpec())


def test_time_instruction_is_upstreams_sentence(videos):
    video = load_video(videos["webm"], VideoSpec(frames_upbound=3, force_sample=True))
    fps = video.source_fps
    stamps = ",".join(f"{index / fps:.2f}s" for index in np.linspace(0, 39, 3, dtype=int))
    expected = (
        "The video lasts for " + f"{40 / fps:.2f}" + " seconds, and 3 frames are uniformly sampled from it. "
        "These frames are located at "
        + stamps
        + ".Please answer the following questions related to this video."
    )
    assert time_instruction(video) == expected
    # by hand: 40 frames at 29.97 fps last 1.33 s; linspace picks frames 0, 19 and 39
    assert stamps == "0.00s,0.63s,1.30s" and "lasts for 1.33 seconds" in expected
