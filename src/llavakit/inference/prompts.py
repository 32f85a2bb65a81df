"""Requests → generation inputs: the same template, tokenisation and pixels as training, left-padded.

A served model must see prompts exactly as it saw them in training, so nothing here re-implements a template or a
preprocessing step: the conversation is rendered by the checkpoint's chat template and tokenised by
`llavakit.data.tokenize.SampleEncoder` (``for_generation=True`` appends the assistant prompt), image placeholders
are expanded with `llavakit.anyres.geometry.count_visual_tokens`, and images are decoded and given their tiling by
`llavakit.inference.images.prepare_images` (a lone image is tiled per the spec, each image of a multi-image request
is one tile, as in training); they are encoded at generation time, through the image-feature cache.

User and system text that spells a control token (``</s>``, ``<|im_start|>assistant``...) stays ordinary text, as in
training (`llavakit.data.tokenize`), so a request cannot open or close a turn: the prompt's control tokens are
exactly the template's. Only ``<image>`` (and ``<video>``, for a model built with video) keeps a meaning, and must
match the request's images (videos) in number.

Videos (`llavakit.inference.videos`) are read with the checkpoint's `VideoSpec` and fill
``video_spec.count_tokens(frames, grid_side)`` ``<video>`` positions each; with ``add_time_instruction`` upstream's
time sentence follows the video's placeholder, in training's text and place.

Rows are padded on the **left** so that every row's next token is predicted at the last position::

    row 0:  <pad> <pad> <s> USER: <image>×88 What colour ... ASSISTANT:
    row 1:  <s> USER: <image>×152 Is the red circle left ... ASSISTANT:
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llavakit.anyres.geometry import count_visual_tokens
from llavakit.anyres.pixels import ImageSource
from llavakit.anyres.spec import ImageSpec
from llavakit.anyres.video_spec import VideoSpec
from llavakit.data.formats import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from llavakit.data.schema import Conversation
from llavakit.data.templates import ChatTemplate
from llavakit.data.tokenize import SampleEncoder
from llavakit.errors import ConfigError, DataError
from llavakit.inference.images import PreparedImage, prepare_images
from llavakit.inference.videos import (
    PreparedVideo,
    VideoInput,
    no_video_error,
    prepare_videos,
    with_time_instruction,
)


@dataclass(frozen=True)
class Request:
    """One generation request.

    Attributes:
        conversation: turns ending with the user turn to answer; ``<image>`` marks where each image goes.
        images: the images, in placeholder order (paths, bytes or PIL images).
        videos: the videos, in ``<video>`` order (paths, frame folders or loaded `Video` values).
    """

    conversation: Conversation
    images: tuple[ImageSource, ...] = ()
    videos: tuple[VideoInput, ...] = ()


@dataclass
class GenerationBatch:
    """Left-padded token inputs for a batch of requests, and their images.

    Attributes:
        input_ids: ``[B, T]`` long, image placeholders expanded, pad on the left.
        attention_mask: ``[B, T]`` long, 0 on the left padding.
        images: every row's images in placeholder order (decoded; encoded later, through the feature cache).
        videos: every row's videos in placeholder order, row after row (the model's ``video_frames`` order).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    images: tuple[PreparedImage, ...] = ()
    videos: tuple[PreparedVideo, ...] = ()


@dataclass(frozen=True)
class EncodedRequest:
    """One request's prompt ids (placeholders expanded), its prepared images and videos."""

    input_ids: list[int]
    images: tuple[PreparedImage, ...]
    videos: tuple[PreparedVideo, ...] = ()


class PromptBuilder:
    """Builds `GenerationBatch` values for one checkpoint's tokenizer, template and specs.

    Args:
        tokenizer: the checkpoint's tokenizer (with ``<image>`` and a pad token; ``<video>`` for a video model).
        template: the checkpoint's chat template.
        image_spec: the checkpoint's preprocessing spec.
        video_spec: the checkpoint's video spec (None: the model takes no videos).
    """

    def __init__(
        self,
        tokenizer: object,
        template: ChatTemplate,
        image_spec: ImageSpec,
        video_spec: VideoSpec | None = None,
    ) -> None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            raise ConfigError("the checkpoint's tokenizer has no pad token; batched generation needs one")
        self.encoder = SampleEncoder(tokenizer, template)
        self.image_spec = image_spec
        self.video_spec = video_spec
        self.pad_token_id = int(pad_id)

    def encode(self, request: Request) -> EncodedRequest:
        """Token ids, decoded images and read videos of one request.

        Raises:
            DataError: the placeholders and images (videos) do not match in number; videos for a model without
                video.
            ImageError: an image is missing, not an image, or unusable (VideoError: the same for a video).
        """
        conversation = request.conversation
        self._check_placeholders(conversation, IMAGE_PLACEHOLDER, len(request.images), "images")
        if request.videos and self.video_spec is None:
            raise no_video_error()
        if self.video_spec is not None:
            self._check_placeholders(conversation, VIDEO_PLACEHOLDER, len(request.videos), "videos")
        images = prepare_images(request.images)
        videos = prepare_videos(request.videos, self.image_spec, self.video_spec)
        if videos and self.video_spec.add_time_instruction:
            conversation = with_time_instruction(conversation, videos[0].instruction)
        counts = [count_visual_tokens(image.size, self.image_spec, tiled=image.tiled) for image in images]
        grid_side = self.image_spec.grid_side
        video_counts = [self.video_spec.count_tokens(video.num_frames, grid_side) for video in videos]
        encoded = self.encoder.encode(
            conversation, counts, for_generation=True, video_token_counts=video_counts
        )
        return EncodedRequest(encoded.input_ids, tuple(images), tuple(videos))

    @staticmethod
    def _check_placeholders(conversation: Conversation, placeholder: str, given: int, what: str) -> None:
        found = sum(turn.text.count(placeholder) for turn in conversation.turns)
        if found != given:
            raise DataError(
                f"the conversation has {found} {placeholder} placeholders but {given} {what} were given: put one "
                f"{placeholder} per {what[:-1]} in the user text"
            )

    def batch(self, requests: Sequence[Request]) -> GenerationBatch:
        """Encode ``requests`` and pad them on the left into one batch."""
        if not requests:
            raise DataError("generation needs at least one request")
        return self.pad([self.encode(request) for request in requests])

    def pad(self, encoded: Sequence[EncodedRequest]) -> GenerationBatch:
        """Left-pad encoded requests into one batch."""
        width = max(len(item.input_ids) for item in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, item in enumerate(encoded):
            length = len(item.input_ids)
            input_ids[row, width - length :] = torch.tensor(item.input_ids, dtype=torch.long)
            attention_mask[row, width - length :] = 1
        return GenerationBatch(
            input_ids,
            attention_mask,
            tuple(image for item in encoded for image in item.images),
            tuple(video for item in encoded for video in item.videos),
        )


def user_text(question: str, num_images: int, num_videos: int = 0) -> str:
    """A user message with one ``<image>`` line per image, then one ``<video>`` line per video, before the
    question (the LLaVA layout)."""
    return f"{IMAGE_PLACEHOLDER}\n" * num_images + f"{VIDEO_PLACEHOLDER}\n" * num_videos + question
