"""Helpers shared by the serving tests (a module of its own: every test folder has a ``conftest``)."""

from __future__ import annotations

import base64
import io

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
