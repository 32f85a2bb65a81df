"""`load_image`: every source type, every colour mode, and a clear `ImageError` for every kind of bad file."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from llavakit.anyres.pixels import load_image
from llavakit.errors import ImageError


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` but holds almost no pixel data: size checks must fire first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_loads_path_bytes_and_pil_identically(tmp_path, make_image):
    image = make_image(20, 30)
    path = tmp_path / "img.png"
    image.save(path)
    from_path, from_bytes, from_pil = load_image(path), load_image(path.read_bytes()), load_image(image)
    for loaded in (from_path, from_bytes, from_pil, load_image(str(path))):
        assert loaded.mode == "RGB" and loaded.size == (30, 20)
        assert np.array_equal(np.asarray(loaded), np.asarray(image))


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "RGB"])
def test_converts_colour_modes_to_rgb(mode, make_image):
    source = make_image(16, 16).convert(mode) if mode != "I;16" else Image.new("I;16", (16, 16), 100)
    loaded = load_image(source)
    assert loaded.mode == "RGB"
    assert np.array_equal(np.asarray(loaded), np.asarray(source.convert("RGB")))


def test_transparency_is_composited_on_white_by_default_like_transformers():
    from transformers.image_transforms import convert_to_rgb

    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (200, 100, 50, 128))
    loaded = np.asarray(load_image(rgba))
    assert np.array_equal(loaded, convert_to_rgb(rgba, return_numpy=True))
    assert loaded[4, 4].tolist() == [255, 255, 255]


def test_transparency_can_be_dropped_like_upstream_llava():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert np.asarray(load_image(rgba, alpha="drop"))[4, 4].tolist() == [10, 20, 30]


def test_palette_transparency_counts_as_alpha():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert np.asarray(load_image(palette))[0, 0].tolist() == [255, 255, 255]


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match=r"nope\.jpg.*does not exist"):
        load_image(missing)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_not_an_image_is_rejected(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture")
    with pytest.raises(ImageError, match=r"notes\.png.*not a readable image"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_rejected(tmp_path, fmt, make_image):
    data = _encode(make_image(64, 64), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(path)


def test_corrupt_bytes_are_rejected(make_image):
    data = bytearray(_encode(make_image(32, 32)))
    data[60:200] = b"\x00" * 140  # clobber the compressed stream but keep the header
    with pytest.raises(ImageError, match=r"image bytes .*corrupt"):
        load_image(bytes(data))


@pytest.mark.parametrize("size", [(1, 1), (1, 50), (50, 1)])
def test_degenerate_sizes_are_rejected(size):
    with pytest.raises(ImageError, match="too small"):
        load_image(Image.new("RGB", size))


@pytest.mark.parametrize("side", [9000, 20000])
def test_huge_image_is_rejected_from_its_header_before_decoding(side):
    # 9000² passes PIL's own bomb check and hits ours; 20000² is refused by PIL at open; both become ImageError
    with pytest.raises(ImageError, match=f"{side}x{side}|too large"):
        load_image(_png_header_only(side, side))


def test_pixel_limit_is_configurable(make_image):
    header = _png_header_only(5000, 5000)
    with pytest.raises(ImageError, match="above the limit of 1000000"):
        load_image(header, max_pixels=1_000_000)
    with pytest.raises(ImageError, match="above the limit"):
        load_image(make_image(100, 100), max_pixels=5000)


def test_unsupported_source_and_alpha_are_rejected(make_image):
    with pytest.raises(ImageError, match="cannot load an image from a int"):
        load_image(42)
    with pytest.raises(ImageError, match="alpha="):
        load_image(make_image(8, 8), alpha="black")
