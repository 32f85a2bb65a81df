"""Images of a request → visual tokens, through the feature cache.

`prepare_images` decodes a request's images once (validating them: `llavakit.anyres.pixels.load_image`), decides
their tiling as training did (`llavakit.data.prepare.default_tiling`: a lone image is tiled, each image of a
multi-image request is one tile) and hashes their pixels. `encode_prepared` then returns each image's ``[n_i, D]``
visual tokens, running the vision tower only on images the `ImageFeatureCache` does not hold, all of them in one
vision batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from llavakit.anyres.pixels import ImageSource, load_image, process_image
from llavakit.data.prepare import default_tiling
from llavakit.inference.feature_cache import ImageFeatureCache, image_digest
from llavakit.model.llava_next import LlavaNextModel


@dataclass(frozen=True)
class PreparedImage:
    """A decoded, validated image and how it will be encoded.

    Attributes:
        image: the RGB image.
        size: (height, width).
        tiled: AnyRes tiles (True) or one tile (False).
        digest: `image_digest` of the pixels (the cache key's content part).
    """

    image: Image.Image
    size: tuple[int, int]
    tiled: bool
    digest: str


def prepare_images(sources: Sequence[ImageSource]) -> list[PreparedImage]:
    """Decode and hash the images of one request (raises `ImageError` naming an unusable one)."""
    images = [load_image(source) for source in sources]
    return [
        PreparedImage(image, (image.height, image.width), flag, image_digest(image))
        for image, flag in zip(images, default_tiling(len(images)))
    ]


@torch.no_grad()
def encode_prepared(
    model: LlavaNextModel,
    images: Sequence[PreparedImage],
    cache: ImageFeatureCache | None = None,
    model_key: str = "",
) -> list[torch.Tensor]:
    """Visual tokens of each image, ``[n_i, D]`` in the model's dtype and device, cached ones reused.

    Args:
        model: the model whose vision tower, projector and image newline encode the images.
        images: prepared images, in placeholder order.
        cache: where features are looked up and stored (None: always encode).
        model_key: tells this model's entries from other models' in a shared cache.
    """
    keys = [(model_key, image.digest, image.tiled) for image in images]
    found = [cache.get(key) if cache is not None else None for key in keys]
    missing = [index for index, features in enumerate(found) if features is None]
    if missing:
        computed = _encode(model, [images[index] for index in missing])
        for index, features in zip(missing, computed):
            found[index] = features
            if cache is not None:
                cache.put(keys[index], features)
    return found


def _encode(model: LlavaNextModel, images: Sequence[PreparedImage]) -> list[torch.Tensor]:
    projector = next(model.projector.parameters())
    device, dtype = projector.device, projector.dtype
    spec = model.config.image_spec
    tiles = torch.cat([process_image(image.image, spec, tiled=image.tiled) for image in images])
    return model.encode_images(
        tiles.to(device=device, dtype=dtype),
        [image.size for image in images],
        [image.tiled for image in images],
    )
