"""Typed records for one training sample, independent of the on-disk format.

LLaVA data comes as dicts whose turns use ``from``/``value`` (``human``/``gpt``/``system``) or ``role``/``content``
(``user``/``assistant``/``system``). Everything after `llavakit.data.formats` works on these records instead, so
templates, tokenisation and inspection never look at raw JSON keys.
"""

from __future__ import annotations

from dataclasses import dataclass

USER = "user"
ASSISTANT = "assistant"
SYSTEM = "system"
ROLES = (USER, ASSISTANT, SYSTEM)


@dataclass(frozen=True)
class Turn:
    """One message of a conversation.

    Attributes:
        role: ``user`` | ``assistant`` | ``system``.
        text: the message; ``<image>`` marks where an image goes, ``<video>`` a video (user turns only).
    """

    role: str
    text: str


@dataclass(frozen=True)
class Conversation:
    """Alternating user/assistant turns, optionally preceded by a sample-specific system prompt.

    Attributes:
        turns: user, assistant, user, assistant, ... (a final user turn is allowed for generation).
        system: a system prompt that replaces the template's default, or None to keep the template's.
    """

    turns: tuple[Turn, ...]
    system: str | None = None


@dataclass(frozen=True)
class Sample:
    """One dataset entry after parsing.

    Attributes:
        id: the sample's ``id`` field (or ``file:line`` when it has none), used in every error message.
        conversation: the turns, placeholders already placed (see `llavakit.data.formats`).
        images: image paths as written in the file (relative to the image folder), in placeholder order.
        location: ``file:line`` of the sample, for error messages.
        videos: video files or frame folders as written (relative to the video folder), in ``<video>`` order.
    """

    id: str
    conversation: Conversation
    images: tuple[str, ...]
    location: str
    videos: tuple[str, ...] = ()

    @property
    def has_image(self) -> bool:
        """True when the sample has at least one image."""
        return bool(self.images)
