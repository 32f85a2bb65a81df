"""OpenAI ``messages`` → a llavakit conversation with ``<image>`` (``<video>``) placeholders, and the URLs in order.

Clients never write ``<image>``: each ``image_url`` part becomes a placeholder where the part is, and parts are joined
with ``"\\n"``, so ``[image, text "Q"]`` is ``"<image>\\nQ"`` — exactly how llavakit's training data and
`llavakit.inference.prompts.user_text` lay a question out (and what the exported Jinja chat template renders).
A leading system (or developer) message replaces the checkpoint's system prompt; then user and assistant messages
must alternate, starting and ending with a user message. Images may sit in any user message, earlier turns
included (multi-turn chats about an image send it once, in the turn that introduced it). Videos come as vLLM's
``video_url`` parts and become ``<video>`` placeholders the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from llavakit.data.formats import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from llavakit.data.schema import ASSISTANT, USER, Conversation, Turn
from llavakit.serving.errors import bad_request
from llavakit.serving.protocol import ImagePart, Message, VideoPart


@dataclass(frozen=True)
class ImageRef:
    """One image (or video) part: its URL and where it is in the request (for error messages)."""

    url: str
    param: str


@dataclass(frozen=True)
class ParsedMessages:
    """The conversation to answer, its images and its videos in placeholder order."""

    conversation: Conversation
    images: tuple[ImageRef, ...]
    videos: tuple[ImageRef, ...] = ()


def parse_messages(
    messages: list[Message], max_images: int, max_videos: int = 1, video_model: bool = True
) -> ParsedMessages:
    """Check and convert ``messages``; every problem is a 400 naming ``messages[i]...``.

    ``<video>`` typed in the text is refused only for a model with video (``video_model``), where it would be a
    placeholder; for other models it is ordinary text (an HTML question, say), as in training.
    """
    reserved = (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER) if video_model else (IMAGE_PLACEHOLDER,)
    system, start = _system_prompt(messages, reserved)
    turns: list[Turn] = []
    images: list[ImageRef] = []
    videos: list[ImageRef] = []
    for index in range(start, len(messages)):
        message = messages[index]
        expected = USER if (index - start) % 2 == 0 else ASSISTANT
        if message.role != expected:
            raise bad_request(
                f"messages[{index}] has role {message.role!r} but {expected!r} was expected: after an optional "
                "system message, user and assistant messages must alternate, starting with a user message",
                param=f"messages[{index}].role",
            )
        text, refs, video_refs = _content(message, index, reserved)
        if (refs or video_refs) and message.role != USER:
            raise bad_request("only user messages may hold images or videos", param=f"messages[{index}].content")
        turns.append(Turn(message.role, text))
        images.extend(refs)
        videos.extend(video_refs)
    if not turns or turns[-1].role != USER:
        raise bad_request("the last message must be a user message (the one to answer)", param="messages")
    if len(images) > max_images:
        raise bad_request(
            f"the request holds {len(images)} images; this server takes at most {max_images} per request",
            param="messages",
            code="too_many_images",
        )
    if len(videos) > max_videos:
        raise bad_request(
            f"the request holds {len(videos)} videos; this server takes at most {max_videos} per request",
            param="messages",
            code="too_many_videos",
        )
    return ParsedMessages(Conversation(tuple(turns), system), tuple(images), tuple(videos))


def _system_prompt(messages: list[Message], reserved: tuple[str, ...]) -> tuple[str | None, int]:
    first = messages[0]
    if first.role not in ("system", "developer"):
        return None, 0
    text, refs, video_refs = _content(first, 0, reserved)
    if refs or video_refs:
        raise bad_request("a system message cannot hold images or videos", param="messages[0].content")
    return text, 1


def _content(
    message: Message, index: int, reserved: tuple[str, ...]
) -> tuple[str, list[ImageRef], list[ImageRef]]:
    if message.role in ("system", "developer") and index > 0:
        raise bad_request(
            "a system message is only allowed first",
            param=f"messages[{index}].role",
            code="unsupported_message_order",
        )
    if message.content is None or message.content == "" or message.content == []:
        raise bad_request(f"messages[{index}] has no content", param=f"messages[{index}].content")
    if isinstance(message.content, str):
        return _checked_text(message.content, f"messages[{index}].content", reserved), [], []
    pieces: list[str] = []
    refs: list[ImageRef] = []
    video_refs: list[ImageRef] = []
    for number, part in enumerate(message.content):
        param = f"messages[{index}].content[{number}]"
        if isinstance(part, ImagePart):
            pieces.append(IMAGE_PLACEHOLDER)
            refs.append(ImageRef(part.image_url.url, f"{param}.image_url"))
        elif isinstance(part, VideoPart):
            pieces.append(VIDEO_PLACEHOLDER)
            video_refs.append(ImageRef(part.video_url.url, f"{param}.video_url"))
        else:
            pieces.append(_checked_text(part.text, f"{param}.text", reserved))
    return "\n".join(pieces), refs, video_refs


def _checked_text(text: str, param: str, reserved: tuple[str, ...]) -> str:
    for placeholder, media in ((IMAGE_PLACEHOLDER, "image"), (VIDEO_PLACEHOLDER, "video")):
        if placeholder in reserved and placeholder in text:
            raise bad_request(
                f"the text contains {placeholder!r}, which is reserved for {media}s: send {media}s as {media}_url "
                "parts (the server places them) and remove the placeholder from the text",
                param=param,
            )
    return text
