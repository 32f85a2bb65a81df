"""A real llavakit server on 127.0.0.1 (the tiny ``checkpoint`` fixture), and images to send it as data URLs."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image, ImageDraw


def png_bytes(size: tuple[int, int], colour: str, shape: str = "circle") -> bytes:
    """A PNG of a coloured shape on white."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def pictures():
    """Three PNGs of different sizes (a lone image is tiled by AnyRes)."""
    return [png_bytes((48, 32), "red"), png_bytes((30, 60), "blue", "square"), png_bytes((40, 40), "green")]


@pytest.fixture(scope="module")
def server(checkpoint):
    """A `BackgroundServer` serving the tiny checkpoint as ``tiny`` (and again as ``tiny-b``) on a free port."""
    from llavakit.serving.config import ModelSpec, ServeConfig
    from llavakit.serving.server import BackgroundServer

    config = ServeConfig(
        models=(ModelSpec("tiny", str(checkpoint)), ModelSpec("tiny-b", str(checkpoint))),
        port=0,
        max_images_per_request=3,
        max_image_pixels=1_000_000,
        max_body_bytes=2 * 1024**2,
    )
    with BackgroundServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
