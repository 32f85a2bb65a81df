"""Image files for the data layer: paths, sizes read from file headers only, and lazy pixel loading.

Token counts depend only on an image's size, so the dataset scan, the length-grouped sampler, packing and
``llavakit data inspect`` read sizes with `read_image_size`, which opens the header (``PIL.Image.open`` is lazy)
and never decodes pixels. It applies the loader's own limits (`llavakit.anyres.pixels.image_size`: smallest side,
largest pixel count, decompression bombs), so a sample that passes the scan is not refused later for its size.
Pixels are decoded in `load_pixels`, inside DataLoader workers, through `llavakit.anyres.pixels`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llavakit.anyres.pixels import image_size, load_image, process_image
from llavakit.anyres.spec import ImageSpec
from llavakit.errors import ImageError


def resolve_image_path(image_folder: str | Path, relative: str) -> Path:
    """``image_folder / relative``; absolute paths are kept as written."""
    path = Path(relative)
    return path if path.is_absolute() else Path(image_folder) / path


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` from the file header, without decoding pixels; `ImageError` if missing, unreadable, or
    outside the limits that `load_pixels` applies (a side below 2 px, more than 8192² pixels). A missing file's
    message says where a dataset's image paths come from (the loader's own message cannot: chat has no folder)."""
    try:
        return image_size(path)
    except ImageError as err:
        if Path(path).is_file():
            raise
        raise ImageError(
            f"{err}; a sample's image path is its 'image' field under the image folder (data.image_folder, "
            "--image-folder)"
        ) from None


def load_pixels(path: str | Path, spec: ImageSpec, tiled: bool) -> torch.Tensor:
    """Decode ``path`` and preprocess it into ``FloatTensor [n_tiles, 3, S, S]`` (see `process_image`)."""
    return process_image(load_image(str(path)), spec, tiled=tiled)
