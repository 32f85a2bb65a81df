"""The minimal inference API: ``llavakit.load(path)`` → an `Assistant` that chats and generates.

    >>> assistant = llavakit.load("runs/demo/final")
    >>> answer, history = assistant.chat("images/cat.png", "What colour is the circle?")
    >>> answer, history = assistant.chat(None, "And the square?", history=history)
    >>> assistant.generate(["<image>\\nWhat word is written?"], images=[["a.png"]], max_new_tokens=4)
    >>> answer, history = assistant.chat(None, "What happens?", video="clips/ball.mp4")   # a video model
    >>> assistant.generate(["What happens?", "Describe it."], videos=[["a.mp4"], ["b.webm"]])

The checkpoint carries everything needed to prompt it as it was trained (``config.json["llavakit"]``: chat template
id and image spec; the tokenizer files), so `load` takes nothing but a path. Prompts go through
`llavakit.inference.prompts` (the training templates and tokenisation) and tokens through
`llavakit.inference.generate` (transformers' generation loop with a KV cache). Encoded images are kept in an `ImageFeatureCache`, so a chat
does not re-run the vision tower on its history's images every turn.

Videos (checkpoints built with a `VideoSpec`) are read with that spec's frame sampling and laid out as in training,
time instruction included when the spec asks for it (`llavakit.inference.videos`); a chat decodes its video once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from llavakit.anyres.pixels import ImageSource
from llavakit.data.formats import VIDEO_PLACEHOLDER
from llavakit.data.schema import ASSISTANT, USER, Conversation, Turn
from llavakit.data.templates import get_template
from llavakit.errors import CheckpointError, ConfigError, DataError
from llavakit.inference.feature_cache import ImageFeatureCache
from llavakit.inference.generate import SamplingParams, decode, generate_ids, stop_token_ids
from llavakit.inference.prompts import PromptBuilder, Request, user_text
from llavakit.inference.videos import VideoInput, no_video_error, read_video
from llavakit.model.llava_next import LlavaNextModel


@dataclass(frozen=True)
class ChatHistory:
    """The state of a multi-turn chat: the turns so far and the images (videos) they refer to, in placeholder
    order. Videos are kept decoded (`llavakit.anyres.video.Video`), so later turns do not read them again."""

    turns: tuple[Turn, ...] = ()
    images: tuple[ImageSource, ...] = field(default=())
    videos: tuple[VideoInput, ...] = field(default=())

    def extended(
        self, question: str, image: ImageSource | None, answer: str, video: VideoInput | None = None
    ) -> ChatHistory:
        """This history plus one exchange (``image``, then ``video``, placed before ``question`` when given)."""
        new_images = () if image is None else (image,)
        new_videos = () if video is None else (video,)
        user = Turn(USER, user_text(question, len(new_images), len(new_videos)))
        turns = (*self.turns, user, Turn(ASSISTANT, answer))
        return ChatHistory(turns, (*self.images, *new_images), (*self.videos, *new_videos))


class Assistant:
    """A loaded model with its tokenizer, template and image spec.

    Args:
        model: a `LlavaNextModel` holding its tokenizer.
        defaults: sampling settings used when a call does not override them.
        template: chat template id replacing the checkpoint's (None: the checkpoint's own).
        system_prompt: system prompt replacing the checkpoint's (None: the checkpoint's own).
        feature_cache: where encoded images are kept between calls (a chat's history images, repeated images);
            None: a private cache of `DEFAULT_MAX_BYTES`. Pass ``ImageFeatureCache(0)`` to disable caching.
    """

    def __init__(
        self,
        model: LlavaNextModel,
        defaults: SamplingParams | None = None,
        template: str | None = None,
        system_prompt: str | None = None,
        feature_cache: ImageFeatureCache | None = None,
    ) -> None:
        if model.tokenizer is None:
            raise CheckpointError(
                "the model has no tokenizer: load a checkpoint saved with its tokenizer files"
            )
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        system = system_prompt if system_prompt is not None else model.config.system_prompt
        self.template = get_template(template or model.config.template, system_prompt=system)
        self.prompts = PromptBuilder(
            self.tokenizer, self.template, model.config.image_spec, model.config.video_spec
        )
        self.stop_ids = stop_token_ids(self.tokenizer, self.template)
        self.defaults = defaults or SamplingParams()
        self.feature_cache = feature_cache if feature_cache is not None else ImageFeatureCache()
        self.model_key = uuid.uuid4().hex

    def generate(
        self,
        prompts: str | Sequence[str],
        images: Sequence[Sequence[ImageSource]] | None = None,
        videos: Sequence[Sequence[VideoInput]] | None = None,
        **sampling: object,
    ) -> list[str]:
        """Answer single-turn prompts in one left-padded batch (text, image and video prompts may mix).

        Args:
            prompts: user messages; each holds one ``<image>`` per image of its row, and one ``<video>`` per video
                (a prompt without ``<video>`` gets its videos' placeholders in front, one line each).
            images: per prompt, its images (paths, bytes or PIL images); None = text only.
            videos: per prompt, its videos (file paths, frame folders or loaded `Video` values); None = none.
                Only for a model built with video.
            sampling: `SamplingParams` fields (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``,
                ``seed``) overriding the defaults.

        Returns:
            One answer per prompt.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = images if images is not None else [()] * len(prompts)
        videos = videos if videos is not None else [()] * len(prompts)
        for name, rows in (("image", images), ("video", videos)):
            if len(rows) != len(prompts):
                raise DataError(f"generate got {len(prompts)} prompts but {len(rows)} {name} lists")
        if any(videos) and self.model.config.video_spec is None:
            raise no_video_error()
        requests = [
            Request(Conversation((Turn(USER, _with_video_lines(prompt, len(clips))),)), tuple(row), tuple(clips))
            for prompt, row, clips in zip(prompts, images, videos)
        ]
        return self.generate_requests(requests, **sampling)

    def generate_requests(self, requests: Sequence[Request], **sampling: object) -> list[str]:
        """Answer full conversations (each ending with a user turn) in one batch; see `generate`."""
        params = replace(self.defaults, **sampling)
        batch = self.prompts.batch(requests)
        self._check_context(batch.attention_mask.sum(dim=1).tolist(), params.max_new_tokens)
        ids = generate_ids(
            self.model,
            batch,
            params,
            self.stop_ids,
            self.prompts.pad_token_id,
            self.feature_cache,
            self.model_key,
        )
        return decode(self.tokenizer, ids, self.template)

    @property
    def context_length(self) -> int:
        """Prompt + answer tokens the LLM takes at most (its ``max_position_embeddings``)."""
        limit = self.model.config.text_config.get("max_position_embeddings")
        return int(limit if limit is not None else self.tokenizer.model_max_length)

    def _check_context(self, prompt_lengths: list[int], max_new_tokens: int) -> None:
        """Refuse prompts that leave no room for the answer: past its context the LLM computes nonsense silently."""
        for row, length in enumerate(prompt_lengths):
            if length + max_new_tokens > self.context_length:
                raise DataError(
                    f"request {row}: the prompt takes {length} tokens (images and videos included) and the answer up to "
                    f"{max_new_tokens}, but the model's context is {self.context_length} tokens: shorten the "
                    "conversation (/reset in the chat), send fewer or smaller images, or lower max_new_tokens"
                )

    def chat(
        self,
        image: ImageSource | None,
        question: str,
        history: ChatHistory | None = None,
        video: VideoInput | None = None,
        **sampling: object,
    ) -> tuple[str, ChatHistory]:
        """One chat turn.

        Args:
            image: an image for this turn (placed before the question), or None to keep talking about the
                history's images (or to chat without images).
            question: the user's message; must not be empty.
            history: the state returned by the previous call, or None to start.
            video: a video for this turn (a file path, frame folder or loaded `Video`; placed after the image,
                before the question), read once with the checkpoint's `VideoSpec`. Only for a video model.
            sampling: `SamplingParams` overrides.

        Returns:
            (answer, the new history).

        Raises:
            DataError: empty question, or a video for a model without video. ImageError: unusable image,
            VideoError: unusable video (the history is unchanged).
        """
        if not question.strip():
            raise DataError("the question is empty: type a question about the image")
        history = history or ChatHistory()
        new_images = () if image is None else (image,)
        new_videos = () if video is None else (read_video(video, self.model.config.video_spec),)
        user = Turn(USER, user_text(question.strip(), len(new_images), len(new_videos)))
        request = Request(
            Conversation((*history.turns, user)), (*history.images, *new_images), (*history.videos, *new_videos)
        )
        (answer,) = self.generate_requests([request], **sampling)
        return answer, history.extended(question.strip(), image, answer, *new_videos)


def _with_video_lines(prompt: str, num_videos: int) -> str:
    """``prompt`` as given when it places its videos itself, else with one ``<video>`` line per video in front."""
    return prompt if VIDEO_PLACEHOLDER in prompt else user_text(prompt, 0, num_videos)


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    template: str | None = None,
    system_prompt: str | None = None,
    feature_cache: ImageFeatureCache | None = None,
    **sampling: object,
) -> Assistant:
    """Load a checkpoint folder (llavakit or llava-hf layout) as an `Assistant`.

    Args:
        path: checkpoint folder (``config.json``, ``model.safetensors``, tokenizer files), or a Hub model id
            (``llava-hf/llava-v1.6-vicuna-7b-hf``), downloaded to the Hub cache on first use.
        device: e.g. ``"cpu"`` or ``"cuda"``; default: CUDA when available, else CPU.
        dtype: parameter dtype; default: the checkpoint's.
        template: chat template id overriding the checkpoint's (e.g. to prompt a model the way another tool did).
        system_prompt: system prompt overriding the checkpoint's.
        feature_cache: image-feature cache (see `Assistant`).
        sampling: default `SamplingParams` fields for every call.

    Raises:
        CheckpointError: the folder is missing files or does not match its config.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} was asked for, but this torch has no CUDA device; use --device cpu"
        )
    path = resolve_checkpoint(path)
    model = LlavaNextModel.from_pretrained(path, dtype=dtype, device=device)
    if model.tokenizer is None:
        raise CheckpointError(
            f"{path} holds no tokenizer files (tokenizer.json / tokenizer_config.json): copy them from the LLM "
            "the model was built from, or re-save the checkpoint with its tokenizer"
        )
    return Assistant(
        model,
        SamplingParams(**sampling),
        template=template,
        system_prompt=system_prompt,
        feature_cache=feature_cache,
    )


def resolve_checkpoint(path: str | Path) -> Path:
    """A local checkpoint folder: ``path`` itself, or the Hub snapshot of model id ``path`` (``owner/name``).

    Raises:
        CheckpointError: neither a folder nor a Hub model that can be fetched (offline: not in the Hub cache).
    """
    folder = Path(path)
    if folder.is_dir():
        return folder
    text = str(path)
    if folder.exists() or text.count("/") != 1 or text.startswith((".", "/")):
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist: pass the folder holding config.json"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text))
    except Exception as err:  # the Hub client raises many types (offline, 404, gated)
        raise CheckpointError(
            f"{text!r} is neither a checkpoint folder nor a Hub model that can be fetched ({type(err).__name__}: "
            f"{err}); pass the folder holding config.json, or download it first (`hf download {text} --local-dir DIR`)"
        ) from None
