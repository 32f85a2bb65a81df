"""The chat-template contract: a conversation renders into text segments, each trainable or not.

A template never returns one prompt string to be re-split later (upstream splits rendered prompts on separators
and re-tokenises the pieces; when the pieces tokenise differently from the whole, it masks the entire sample with a
"tokenization mismatch" warning and the loss silently becomes 0). Instead `ChatTemplate.render` returns
`Segment` values; `llavakit.data.tokenize` tokenises each segment once and concatenates the ids, so labels line up
with input ids by construction. ``<image>`` placeholders stay inside the (untrained) segment text and are expanded
by the tokenizer step.

Templates are frozen values registered by id in `TEMPLATES`; the id is stored in the checkpoint and reused by
inference. ``upstream_quirks=True`` (the default) reproduces what published checkpoints were trained with, even
where upstream is arguably wrong; each family documents its quirks, and ``upstream_quirks=False`` fixes them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from llavakit.data.schema import ASSISTANT, USER, Conversation
from llavakit.errors import DataError


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; ``trainable`` pieces are supervised (their labels are their ids)."""

    text: str
    trainable: bool


@dataclass(frozen=True)
class ChatTemplate(ABC):
    """Base of every chat template.

    Attributes:
        id: registry id, saved in checkpoints.
        system: default system prompt (a sample's own system turn replaces it).
        add_bos: prepend the tokenizer's BOS token (when it has one) before the first segment, as upstream's
            ``tokenizer(prompt)`` does; templates that write the BOS text themselves set False.
        stop_strings: strings that end generation besides the tokenizer's EOS.
        upstream_quirks: reproduce upstream training behaviour (see each family) instead of the fixed one.
    """

    id: str
    system: str = ""
    add_bos: bool = True
    stop_strings: tuple[str, ...] = ()
    upstream_quirks: bool = True

    @abstractmethod
    def render(
        self, conversation: Conversation, *, for_generation: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        """Render ``conversation``; with ``for_generation`` the assistant prompt is appended after a final user turn."""

    def always_trained_tokens(self) -> tuple[str, ...]:
        """Token strings whose labels are kept wherever they occur (an upstream quirk of some families)."""
        return ()

    def ignores_system_prompt(self) -> str | None:
        """Why training would not render a configured system prompt (held in ``system``), and the fix; None where
        every sample without a system turn of its own is trained with it."""
        return None

    def system_prompt(self, conversation: Conversation) -> str:
        """The sample's system prompt, or this template's default."""
        return self.system if conversation.system is None else conversation.system


def check_generation_turns(conversation: Conversation, template_id: str, for_generation: bool) -> None:
    """Raise `DataError` unless a generation prompt follows a final user turn."""
    turns = conversation.turns
    if for_generation and (not turns or turns[-1].role != USER):
        raise DataError(f"template {template_id}: generation needs a conversation that ends with a user turn")
    for number, turn in enumerate(turns):
        expected = USER if number % 2 == 0 else ASSISTANT
        if turn.role != expected:
            raise DataError(f"template {template_id}: turn {number} is {turn.role!r}, expected {expected!r}")
