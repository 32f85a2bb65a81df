"""Videos of a request → frame tensors for the model, sampled and laid out as the checkpoint was trained.

A video model's checkpoint carries its `VideoSpec` (``config.json["llavakit"]["video_spec"]``), so inference reads
frames with `llavakit.anyres.video.load_video` under that spec (upstream's fps step, ``frames_upbound``,
``force_sample``) and preprocesses them with `process_frames` (one tile per frame, the vision tower's own resize),
exactly as training does. Each video then fills ``video_spec.count_tokens(F, grid_side)`` ``<video>`` positions.

With ``add_time_instruction`` (LLaVA-Video recipes) the prompt also carries upstream's sentence giving the video's
length and its frames' times (`llavakit.anyres.video.time_instruction`), in the same text and place as training
(`llavakit.data.prepare.with_time_instruction`, upstream's ``LazySupervisedDataset._get_item``): the user turn that
holds the video becomes ``<video>\n{sentence}\n{its text without the placeholder}``, so a question asked as
``<video>\nWhat happens?`` reads ``<video>\n{sentence}\n\nWhat happens?`` (upstream's kept newline). Upstream's
sentence describes one video, so such a model takes one video per conversation, as in training. Training moves the
placeholder into the first user turn; a chat that brings its video in a later turn keeps it in that turn.

Videos are not feature-cached as images are: the model takes videos as frames (``pixel_values_videos``), so a
chat re-encodes its history's frames each turn. A chat keeps the decoded `Video` instead, so a file is decoded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from llavakit.anyres.spec import ImageSpec
from llavakit.anyres.video import Video, VideoSource, load_video, process_frames, time_instruction
from llavakit.anyres.video_spec import VideoSpec
from llavakit.data.formats import VIDEO_PLACEHOLDER, timed_video_text
from llavakit.data.schema import USER, Conversation
from llavakit.errors import DataError

VideoInput = VideoSource | Video


@dataclass(frozen=True)
class PreparedVideo:
    """A video's sampled frames, preprocessed, and what its prompt needs.

    Attributes:
        pixels: ``[F, 3, S, S]`` normalised frames (float32, CPU).
        instruction: upstream's time sentence for this video (used when the spec adds it).
    """

    pixels: torch.Tensor
    instruction: str

    @property
    def num_frames(self) -> int:
        return int(self.pixels.shape[0])


def no_video_error() -> DataError:
    """The refusal for videos sent to a model built without video."""
    return DataError(
        "this model takes no videos (its checkpoint has no video_spec): send images or text, or use a model "
        "built with video (LlavaNextModel.from_parts(..., video_spec=VideoSpec(...)))"
    )


def read_video(source: VideoInput, spec: VideoSpec | None) -> Video:
    """``source`` as a `Video`: a path is read with ``spec``'s sampling; a `Video` is taken as it is.

    Raises:
        DataError: ``spec`` is None (the model takes no videos). VideoError: the file is unusable.
    """
    if spec is None:
        raise no_video_error()
    return source if isinstance(source, Video) else load_video(source, spec)


def prepare_videos(
    sources: Sequence[VideoInput], image_spec: ImageSpec, video_spec: VideoSpec | None
) -> list[PreparedVideo]:
    """Read and preprocess the videos of one request, in placeholder order."""
    prepared = []
    for source in sources:
        video = read_video(source, video_spec)
        pixels = process_frames(video.frames, image_spec, video_spec)
        prepared.append(PreparedVideo(pixels, time_instruction(video)))
    return prepared


def video_inputs(
    videos: Sequence[PreparedVideo], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The model's video arguments for ``videos`` (all rows', in placeholder order, row after row).

    Returns:
        ``{}`` without videos, else ``pixel_values_videos [ΣF, 3, S, S]`` and ``video_frames [N]``.
    """
    if not videos:
        return {}
    return {
        "pixel_values_videos": torch.cat([video.pixels for video in videos]).to(device=device, dtype=dtype),
        "video_frames": torch.tensor([video.num_frames for video in videos], device=device),
    }


def with_time_instruction(conversation: Conversation, instruction: str) -> Conversation:
    """``conversation`` with the user turn holding its one ``<video>`` rewritten as
    ``<video>\n{instruction}\n{the turn's text without the placeholder}`` (training's layout, see the module
    docstring).

    Raises:
        DataError: the conversation does not hold exactly one ``<video>``.
    """
    found = sum(turn.text.count(VIDEO_PLACEHOLDER) for turn in conversation.turns)
    if found != 1:
        raise DataError(
            f"the conversation has {found} videos, but this model's video_spec.add_time_instruction describes one "
            "video per conversation (as it was trained): send one video, or start a new conversation for the next"
        )
    turns = tuple(
        replace(turn, text=timed_video_text(turn.text, instruction))
        if turn.role == USER and VIDEO_PLACEHOLDER in turn.text
        else turn
        for turn in conversation.turns
    )
    return replace(conversation, turns=turns)
