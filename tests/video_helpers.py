"""Synthetic test videos encoded with PyAV, shared by the video tests (anyres, data, training).

Frame ``i`` is one solid colour from a palette whose channels sit 64 levels apart (`colour`), so a decoded frame's
index is recovered exactly despite codec loss.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

LEVELS = (32, 96, 160, 224)
SIDE = 32


def colour(index: int) -> tuple[int, int, int]:
    """Frame ``index``'s solid colour: its base-4 digits as channel levels (64 distinct colours)."""
    return LEVELS[(index // 16) % 4], LEVELS[(index // 4) % 4], LEVELS[index % 4]


def encode_video(
    path: Path,
    frames: int,
    fps: float | Fraction,
    codec: str = "libx264",
    noise: bool = False,
    codec_options: dict[str, str] | None = None,
    **options: str,
) -> Path:
    """Write ``frames`` solid-colour frames (frame i: ``_colour(i)``) at ``fps`` into ``path`` with PyAV.

    ``noise`` adds ±16 levels of noise so the frame data outweighs the container's headers (truncation tests);
    ``codec_options`` go to the encoder, ``options`` to the muxer.
    """
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w", options=options) as container:
        rate = Fraction(fps).limit_denominator(100000)
        stream = container.add_stream(codec, rate=rate, options=codec_options or {})
        stream.width, stream.height, stream.pix_fmt = SIDE, SIDE, "yuv420p"
        if frames == 0:
            container.start_encoding()
        for index in range(frames):
            pixels = np.full((SIDE, SIDE, 3), colour(index), dtype=np.int16)
            if noise:
                pixels += rng.integers(-16, 17, pixels.shape, dtype=np.int16)
            pixels = pixels.astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path
