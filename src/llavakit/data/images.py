"""Image files for the data layer: paths, sizes read from file headers only, and lazy pixel loading.

Token counts depend only on an image's size, so the dataset scan, the length-grouped sampler, packing and
``llavakit data inspect`` read sizes with `read_image_size`, which opens the header (``PIL.Image.open`` is lazy)
and never decodes pixels. Pixels are decoded in `load_pixels`, inside DataLoader workers, through
`llavakit.anyres.pixels`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from llavakit.anyres.pixels import load_image, process_image
from llavakit.anyres.spec import ImageSpec
from llavakit.errors import ImageError


def resolve_image_path(image_folder: str | Path, relative: str) -> Path:
    """``image_folder / relative``; absolute paths are kept as written."""
    path = Path(relative)
    return path if path.is_absolute() else Path(image_folder) / path


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` from the file header, without decoding pixels; `ImageError` if missing or unreadable."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise ImageError(
            f"image {path} does not exist: check the image folder and the sample's 'image' path"
        ) from None
    except (UnidentifiedImageError, OSError) as err:
        raise ImageError(f"image {path} is not a readable image ({err}); re-encode or remove it") from None
    if width <= 0 or height <= 0:
        raise ImageError(f"image {path} has an empty size {width}x{height}")
    return height, width


def load_pixels(path: str | Path, spec: ImageSpec, tiled: bool) -> torch.Tensor:
    """Decode ``path`` and preprocess it into ``FloatTensor [n_tiles, 3, S, S]`` (see `process_image`)."""
    return process_image(load_image(str(path)), spec, tiled=tiled)
