"""Requests → generation inputs: the same template, tokenisation and pixels as training, left-padded.

A served model must see prompts exactly as it saw them in training, so nothing here re-implements a template or a
preprocessing step: the conversation is rendered by the checkpoint's chat template and tokenised by
`llavakit.data.tokenize.SampleEncoder` (``for_generation=True`` appends the assistant prompt), image placeholders
are expanded with `llavakit.anyres.geometry.count_visual_tokens`, and pixels come from
`llavakit.anyres.pixels.process_image`. Single images are tiled per the spec and each image of a multi-image
request is one tile (`llavakit.data.prepare.default_tiling`), as in training.

Rows are padded on the **left** so that every row's next token is predicted at the last position::

    row 0:  <pad> <pad> <s> USER: <image>×88 What colour ... ASSISTANT:
    row 1:  <s> USER: <image>×152 Is the red circle left ... ASSISTANT:
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llavakit.anyres.geometry import count_visual_tokens
from llavakit.anyres.pixels import ImageSource, load_image, process_image
from llavakit.anyres.spec import ImageSpec
from llavakit.data.formats import IMAGE_PLACEHOLDER
from llavakit.data.prepare import default_tiling
from llavakit.data.schema import Conversation
from llavakit.data.templates import ChatTemplate
from llavakit.data.tokenize import SampleEncoder
from llavakit.errors import ConfigError, DataError


@dataclass(frozen=True)
class Request:
    """One generation request.

    Attributes:
        conversation: turns ending with the user turn to answer; ``<image>`` marks where each image goes.
        images: the images, in placeholder order (paths, bytes or PIL images).
    """

    conversation: Conversation
    images: tuple[ImageSource, ...] = ()


@dataclass
class GenerationBatch:
    """Left-padded model inputs for a batch of requests.

    Attributes:
        input_ids: ``[B, T]`` long, image placeholders expanded, pad on the left.
        attention_mask: ``[B, T]`` long, 0 on the left padding.
        pixel_values: ``[N_tiles, 3, S, S]`` tiles of every image in placeholder order, or None.
        image_sizes: ``[N_images, 2]`` (height, width), or None.
        image_tiled: ``[N_images]`` bool, or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    image_tiled: torch.Tensor | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> GenerationBatch:
        """The batch on ``device``, pixels cast to the model's ``dtype``."""
        pixels = None if self.pixel_values is None else self.pixel_values.to(device=device, dtype=dtype)
        return GenerationBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            pixels,
            None if self.image_sizes is None else self.image_sizes.to(device),
            None if self.image_tiled is None else self.image_tiled.to(device),
        )


@dataclass(frozen=True)
class _EncodedRequest:
    input_ids: list[int]
    tiles: list[torch.Tensor]
    sizes: list[tuple[int, int]]
    tiled: tuple[bool, ...]


class PromptBuilder:
    """Builds `GenerationBatch` values for one (tokenizer, template, image spec) triple.

    Args:
        tokenizer: the checkpoint's tokenizer (with ``<image>`` and a pad token).
        template: the checkpoint's chat template.
        image_spec: the checkpoint's preprocessing spec.
    """

    def __init__(self, tokenizer: object, template: ChatTemplate, image_spec: ImageSpec) -> None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            raise ConfigError("the checkpoint's tokenizer has no pad token; batched generation needs one")
        self.encoder = SampleEncoder(tokenizer, template)
        self.image_spec = image_spec
        self.pad_token_id = int(pad_id)

    def encode(self, request: Request) -> _EncodedRequest:
        """Token ids and tiles of one request.

        Raises:
            DataError: the placeholders and images do not match in number.
            ImageError: an image is missing, not an image, or unusable.
        """
        placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in request.conversation.turns)
        if placeholders != len(request.images):
            raise DataError(
                f"the conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(request.images)} "
                "images were given: put one <image> per image in the user text"
            )
        images = [load_image(source) for source in request.images]
        tiled = default_tiling(len(images))
        sizes = [(image.height, image.width) for image in images]
        counts = [count_visual_tokens(size, self.image_spec, tiled=flag) for size, flag in zip(sizes, tiled)]
        encoded = self.encoder.encode(request.conversation, counts, for_generation=True)
        tiles = [process_image(image, self.image_spec, tiled=flag) for image, flag in zip(images, tiled)]
        return _EncodedRequest(encoded.input_ids, tiles, sizes, tiled)

    def batch(self, requests: Sequence[Request]) -> GenerationBatch:
        """Encode ``requests`` and pad them on the left into one batch."""
        if not requests:
            raise DataError("generation needs at least one request")
        encoded = [self.encode(request) for request in requests]
        width = max(len(item.input_ids) for item in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, item in enumerate(encoded):
            length = len(item.input_ids)
            input_ids[row, width - length :] = torch.tensor(item.input_ids, dtype=torch.long)
            attention_mask[row, width - length :] = 1
        tiles = [tile for item in encoded for tile in item.tiles]
        if not tiles:
            return GenerationBatch(input_ids, attention_mask)
        return GenerationBatch(
            input_ids,
            attention_mask,
            torch.cat(tiles),
            torch.tensor([size for item in encoded for size in item.sizes], dtype=torch.long),
            torch.tensor([flag for item in encoded for flag in item.tiled], dtype=torch.bool),
        )


def user_text(question: str, num_images: int) -> str:
    """A user message with one ``<image>`` line per image before the question (the LLaVA layout)."""
    return f"{IMAGE_PLACEHOLDER}\n" * num_images + question
