"""Image loading and pixel preprocessing: an image becomes ``[n_tiles, 3, S, S]`` normalised tiles.

Loading is the one place where untrusted files enter, so `load_image` validates everything (existence, decodability,
truncation, size limits) before any pixel work and raises `ImageError` with the source and the fix.

`process_image` reproduces transformers' ``LlavaNextImageProcessorPil`` bit for bit for AnyRes (same PIL resizes on
uint8 RGB, same ``min(ceil(...), target)`` letterbox sizes, same black centre padding, same float64 rescale then
float32 normalisation) but does each resize and the normalisation once per image instead of once per tile; the
normalisation is a per-channel 256-entry lookup table computed with transformers' exact arithmetic.

Upstream quirks, each a named option:

- ``ImageSpec.base_view="squash"``: the base view (tile 0) is the whole image resized to S×S, aspect ratio not kept
  (upstream ``process_anyres_image`` "FIXME", kept by transformers). ``"letterbox"`` fits and pads it with black.
- ``pad`` mode fills with the mean colour ``int(m * 255)`` per channel (upstream ``expand2square``), not black.
- ``load_image(alpha="white")`` composites transparency over white like transformers' ``convert_to_rgb``;
  ``alpha="drop"`` is upstream LLaVA's ``.convert("RGB")`` (the hidden colour under transparent pixels shows).
- EXIF orientation is not applied, like upstream and transformers (the model was trained on raw pixel order).
"""

from __future__ import annotations

import functools
import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from llavakit.anyres.geometry import Size, letterbox_size, select_best_resolution
from llavakit.anyres.spec import RESAMPLE_FILTERS, ImageSpec
from llavakit.errors import ImageError

ImageSource = str | os.PathLike | bytes | Image.Image

DEFAULT_MIN_SIDE = 2
# 8192² pixels: far above the largest AnyRes canvas (2304² for OneVision), far below decompression bombs.
DEFAULT_MAX_PIXELS = 8192 * 8192
ALPHA_MODES = ("white", "drop")

_RESAMPLE = {name: Image.Resampling[name.upper()] for name in RESAMPLE_FILTERS}
# transformers rescales by this float64 factor before casting to float32; reuse it for identical rounding.
_RESCALE = 1 / 255
# A scheme such as https:// (pathlib folds its "//" into "/"); two letters at least, so C:/ stays a path.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def load_image(
    source: ImageSource,
    *,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    alpha: str = "white",
) -> Image.Image:
    """Open and fully decode an image as RGB, or raise `ImageError` saying what is wrong and what to do.

    A path or bytes source is also checked for truncation (`check_complete`) before decoding; an already opened
    PIL image cannot be (its bytes are gone), so its opener must check.

    Args:
        source: a file path, the encoded file bytes, or an already opened PIL image.
        min_side: smallest accepted height/width in pixels.
        max_pixels: largest accepted height*width, checked from the header before decoding.
        alpha: ``"white"`` composites transparency over white (transformers), ``"drop"`` ignores the alpha channel
            (upstream LLaVA ``.convert("RGB")``).

    Returns:
        A decoded ``RGB`` PIL image (RGBA, LA, P, L, CMYK, ... are converted).
    """
    if alpha not in ALPHA_MODES:
        raise ImageError(f"load_image alpha={alpha!r} must be one of {ALPHA_MODES}")
    label = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        source = _read_file(source, label)
    image = source if isinstance(source, Image.Image) else _open(source, label)
    _check_dimensions(image.size, label, min_side, max_pixels)
    if isinstance(source, (bytes, bytearray)):
        check_complete(bytes(source), image.format, label)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(
            f"{label}: the image data is corrupt or truncated ({exc}); re-download or re-encode it"
        ) from exc
    return _to_rgb(image, alpha)


def image_size(
    source: ImageSource, *, min_side: int = DEFAULT_MIN_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Size:
    """(height, width) of an image from its header alone (no pixel decoding), checked like `load_image`.

    Planning code (evaluation batches sorted by length) needs every image's token count before decoding any;
    `load_image` still decodes and may then find the pixel data truncated.
    """
    label = _describe(source)
    if isinstance(source, Image.Image):
        _check_dimensions(source.size, label, min_side, max_pixels)
        return source.height, source.width
    with _open(source, label) as image:
        _check_dimensions(image.size, label, min_side, max_pixels)
        return image.height, image.width


def _describe(source: ImageSource) -> str:
    """How error messages name the image."""
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode}, {source.width}x{source.height})"
    if isinstance(source, (bytes, bytearray)):
        return f"image bytes ({len(source)} bytes)"
    if isinstance(source, (str, os.PathLike)):
        return f"image file {os.fspath(source)!r}"
    raise ImageError(
        f"cannot load an image from a {type(source).__name__}: pass a path, bytes or a PIL image"
    )


def _read_file(source: str | os.PathLike, label: str) -> bytes:
    """The whole file, so `check_complete` sees the same bytes that are decoded."""
    _check_file(Path(source), label)
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ImageError(f"{label} cannot be read ({exc}); check permissions and the file") from exc


def _check_file(path: Path, label: str) -> None:
    """Refuse a path that is no file. The message names the path as given and as looked for; callers that resolve
    it against a folder of their own (datasets) add where it came from (`llavakit.data.images`)."""
    if path.is_file():
        return
    if is_url(path):
        raise ImageError(
            f"{label} is a URL, but images are read from local files here: download it first (e.g. `curl -O URL`) "
            "and pass the file"
        )
    reason = "is a directory" if path.is_dir() else "does not exist"
    raise ImageError(f"{label} {reason} (looked for {path.absolute()}): check the path")


def _open(source: str | os.PathLike | bytes, label: str) -> Image.Image:
    """Read the header only (lazy PIL open), translating every failure into an `ImageError`."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        _check_file(path, label)
        stream: str | os.PathLike | io.BytesIO = path
    else:
        stream = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below replaces PIL's decompression-bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(stream)
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"{label} is not a readable image format; convert it to PNG/JPEG or remove the sample"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label} is too large to decode safely ({exc}); downscale it first") from exc
    except OSError as exc:
        raise ImageError(f"{label} cannot be read ({exc}); check permissions and the file") from exc


def check_complete(data: bytes, image_format: str | None, label: str) -> None:
    """Refuse truncated PNG and JPEG files whatever ``ImageFile.LOAD_TRUNCATED_IMAGES`` says.

    Any imported library may set that process-wide flag (lmms-eval does), and PIL then pads a truncated PNG or
    JPEG with black instead of failing, so training or evaluation would silently see a half-black image. PNG's
    ``verify`` walks every chunk's CRC up to IEND regardless of the flag; a complete JPEG has an end-of-image
    marker after its last start-of-scan marker (a thumbnail's EOI comes earlier). Both are cheap next to the
    decode. Other formats fail to decode truncated data even with the flag set.
    """
    if image_format == "PNG":
        try:
            with Image.open(io.BytesIO(data), formats=("PNG",)) as probe:
                probe.verify()
        except Exception as exc:  # verify raises OSError / SyntaxError / struct.error on broken chunks
            raise _truncated(label, exc) from exc
    elif image_format == "JPEG" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise _truncated(label, OSError("no end-of-image marker after the last scan"))


def _truncated(label: str, exc: Exception) -> ImageError:
    return ImageError(
        f"{label}: the image data is corrupt or truncated ({type(exc).__name__}: {exc}); re-download or "
        "re-encode it"
    )


def _check_dimensions(size: tuple[int, int], label: str, min_side: int, max_pixels: int) -> None:
    """Reject degenerate and oversized images before decoding (``size`` is PIL's (width, height))."""
    width, height = size
    if min(width, height) < min_side:
        raise ImageError(
            f"{label} is {width}x{height} (WxH): a side is below {min_side} px, too small to tile; remove or replace it"
        )
    if width * height > max_pixels:
        raise ImageError(
            f"{label} is {width}x{height} (WxH) = {width * height} pixels, above the limit of {max_pixels}; "
            "downscale it or raise max_pixels"
        )


def _to_rgb(image: Image.Image, alpha: str) -> Image.Image:
    """Convert any PIL mode to RGB, handling transparency per ``alpha``."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha and alpha == "white":
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def process_image(image: Image.Image, spec: ImageSpec, tiled: bool = True) -> torch.Tensor:
    """Preprocess one RGB image into normalised tiles.

    Args:
        image: a decoded RGB PIL image (use `load_image`).
        spec: the preprocessing spec.
        tiled: False forces a single tile even for AnyRes specs (multi-image samples), using
            ``spec.multi_image_aspect_ratio``.

    Returns:
        ``FloatTensor [n_tiles, 3, S, S]`` (S = ``spec.tile_size``). AnyRes: tile 0 is the base view, then the grid
        tiles row-major, ``n_tiles = 1 + rows * cols``. Otherwise ``n_tiles = 1``.
    """
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        found = image.mode if isinstance(image, Image.Image) else type(image).__name__
        raise ImageError(f"process_image needs an RGB PIL image, got {found}: open images with load_image()")
    if tiled and spec.uses_anyres:
        return _normalize(_anyres_tiles(image, spec), spec)
    mode = spec.multi_image_aspect_ratio if spec.uses_anyres else spec.aspect_ratio
    view = _pad_view(image, spec) if mode == "pad" else _square_view(image, spec)
    return _normalize(_split_tiles(view, spec.tile_size), spec)


def _anyres_tiles(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Base view + row-major grid tiles of the letterboxed best-fit canvas: uint8 ``[1 + rows*cols, 3, S, S]``."""
    size = spec.tile_size
    canvas = _letterbox(image, select_best_resolution((image.height, image.width), spec.pinpoints), spec)
    if spec.base_view == "squash":
        base = np.asarray(image.resize((size, size), _RESAMPLE[spec.resample]))
    else:
        base = _letterbox(image, (size, size), spec)
    return np.concatenate([_split_tiles(base, size), _split_tiles(canvas, size)])


def frame_tiles(frames: list[Image.Image], spec: ImageSpec, view: str) -> torch.Tensor:
    """Video frames, one tile each: ``[F, 3, S, S]`` normalised like images.

    ``view`` is ``squash`` (the whole frame resized to S×S: SigLIP's processor, transformers' LlavaOnevision video
    processor) or ``crop`` (shortest edge to S, centre S×S: CLIP's, the ``square`` image mode).
    """
    make_view = _squash_view if view == "squash" else _square_view
    tiles = [_split_tiles(make_view(frame, spec), spec.tile_size) for frame in frames]
    return _normalize(np.concatenate(tiles), spec)


def is_url(source: str | os.PathLike) -> bool:
    """Whether a path argument is really a URL (``https://...``), which local loaders refuse with a hint."""
    return bool(_URL.match(os.fspath(source)))


def _split_tiles(view: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[rows*S, cols*S, 3]`` → row-major tiles ``[rows*cols, 3, S, S]`` (cheap: still 1 byte per value)."""
    rows, cols = view.shape[0] // size, view.shape[1] // size
    return (
        view.reshape(rows, size, cols, size, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, size, size)
    )


def _letterbox(image: Image.Image, target_hw: tuple[int, int], spec: ImageSpec) -> np.ndarray:
    """Fit the image in ``target_hw`` keeping its aspect ratio, centred on black: uint8 ``[H, W, 3]``."""
    new_h, new_w = letterbox_size((image.height, image.width), target_hw)
    resized = np.asarray(image.resize((new_w, new_h), _RESAMPLE[spec.resample]))
    canvas = np.zeros((*target_hw, 3), dtype=np.uint8)
    top, left = (target_hw[0] - new_h) // 2, (target_hw[1] - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def _pad_view(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Upstream ``pad`` mode: expand to a square filled with the mean colour, then resize to S×S."""
    width, height = image.size
    side = max(width, height)
    fill = tuple(int(m * 255) for m in spec.image_mean)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return _square_view(square, spec)


def _squash_view(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """The whole image resized to S×S, aspect ratio not kept: uint8 ``[S, S, 3]``."""
    return np.asarray(image.resize((spec.tile_size, spec.tile_size), _RESAMPLE[spec.resample]))


def _square_view(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """CLIP-style ``square`` mode: shortest edge to S (long edge ``int(S * long / short)``), centre crop S×S."""
    size, (width, height) = spec.tile_size, image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    resized = np.asarray(image.resize((new_w, new_h), _RESAMPLE[spec.resample]))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


def _normalize(tiles: np.ndarray, spec: ImageSpec) -> torch.Tensor:
    """uint8 tiles ``[N, 3, S, S]`` → normalised float32 ``[N, 3, S, S]`` through a per-channel lookup table."""
    table = _lookup_table(spec.image_mean, spec.image_std)
    out = np.empty(tiles.shape, dtype=np.float32)
    # one contiguous [S, S] plane per call: several times faster than strided or fancy indexing
    for tile in range(tiles.shape[0]):
        for channel in range(3):
            np.take(table[channel], tiles[tile, channel], out=out[tile, channel], mode="clip")
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=16)
def _lookup_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``[3, 256]`` float32 table of ``(v / 255 - mean) / std`` with transformers' rounding steps.

    transformers rescales in float64 then casts to float32, and normalises in float32; doing the same per value
    makes every pixel bit-identical to ``LlavaNextImageProcessorPil``.
    """
    values = (np.arange(256, dtype=np.float64) * _RESCALE).astype(np.float32)
    mean_f32, std_f32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return ((values[None, :] - mean_f32[:, None]) / std_f32[:, None]).astype(np.float32)
