"""A real llavakit server on 127.0.0.1 (the tiny ``checkpoint`` fixture), and images to send it as data URLs."""

from __future__ import annotations

import pytest
from serving_fixtures import png_bytes


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
