"""Video decoding for training: `load_video` seeking to the sampled frames vs one sequential pass.

Why: LLaVA-Video samples 32 frames spread over the whole clip (``frames_upbound: 32``, ``force_sample``), so a
sequential pass decodes every frame of every training video; seeking decodes about one GOP per sampled frame.

The clip is synthetic: 1 minute at 30 fps, 640x360, H.264 in MP4 (a textured scene panning 3 pixels a frame with a
moving noise patch, so frames are neither static nor pure noise), encoded twice: with a 1 s GOP (``g=30``, common in
camera and streaming files) and with x264's default (``keyint=250``, about 8 s). Both paths get the same probe (its
demux is timed apart, once), so only decoding is compared: A is `load_video` as it is (seeking), B the same call
with a probe stripped of its frame index (the sequential pass). Runs alternate A/B; each prints its seconds and the
frames decoded (counted with the `DecodeGuard.on_frame` hook), and the frames of A and B are checked equal.

Run: ``python benchmarks/video_decode.py [--repeats 3] [--folder DIR]``. It is not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from llavakit.anyres.video import DecodeGuard, Video, VideoProbe, load_video, probe_video
from llavakit.anyres.video_spec import VideoSpec

WIDTH, HEIGHT, FPS, SECONDS = 640, 360, 30, 60
SPEC = VideoSpec(frames_upbound=32, force_sample=True)


def encode_clip(path: Path, gop: int | None) -> Path:
    """Write the synthetic clip; ``gop`` None keeps x264's default keyframe interval."""
    import av

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 4, 3), dtype=np.uint8)
    scene = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)  # twice the frame's width, to pan across
    options = {"preset": "veryfast"} | ({"g": str(gop)} if gop else {})
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS), options=options)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(FPS * SECONDS):
            left = (3 * index) % WIDTH
            pixels = scene[:, left : left + WIDTH].copy()
            top, across = (2 * index) % (HEIGHT - 64), (5 * index) % (WIDTH - 64)
            pixels[top : top + 64, across : across + 64] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def timed_load(path: Path, probe: VideoProbe) -> tuple[float, int, Video]:
    """(seconds, frames decoded, video) of one `load_video` call given ``probe``."""
    decoded: list[int] = []
    guard = DecodeGuard(on_frame=lambda index, width, height: decoded.append(index))
    started = time.perf_counter()
    video = load_video(path, SPEC, guard, probe=probe)
    return time.perf_counter() - started, len(decoded), video


def compare(path: Path, label: str, repeats: int) -> None:
    """Alternate seeking (A) and sequential (B) loads of ``path`` and print the times and the ratio."""
    started = time.perf_counter()
    probe = probe_video(path, SPEC)
    probe_s = time.perf_counter() - started
    index = probe.frame_index
    print(
        f"{label}: {probe.total_frames} frames, {len(index.keyframes)} keyframes, probe (demux) {probe_s:.3f} s, "
        f"{probe.num_frames} sampled frames up to frame {probe.frame_indices[-1]}"
    )
    sequential = replace(probe, frame_index=None)
    times: dict[str, list[float]] = {"A seek": [], "B sequential": []}
    videos: dict[str, Video] = {}
    for repeat in range(repeats):
        for name, given in (("A seek", probe), ("B sequential", sequential)):
            seconds, decoded, videos[name] = timed_load(path, given)
            times[name].append(seconds)
            print(f"  run {repeat + 1} {name:<12} {seconds:7.3f} s  {decoded:5d} frames decoded")
    same = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(videos["A seek"].frames, videos["B sequential"].frames)
    )
    seek_s, sequential_s = statistics.median(times["A seek"]), statistics.median(times["B sequential"])
    print(
        f"  median: seek {seek_s:.3f} s, sequential {sequential_s:.3f} s, sequential / seek = "
        f"{sequential_s / seek_s:.2f}x; frames identical: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--folder", type=Path, default=None, help="where to write the clips (default: a temp dir)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="video-decode-") as temporary:
        folder = args.folder or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        for gop, label in ((30, "GOP 30 (1 s)"), (None, "x264 default GOP (keyint 250)")):
            name = f"clip_g{gop or 'default'}.mp4"
            path = folder / name if (folder / name).exists() else encode_clip(folder / name, gop)
            compare(path, label, args.repeats)


if __name__ == "__main__":
    main()
