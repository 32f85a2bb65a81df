"""``tokenizer``: use the tokenizer's own Jinja ``chat_template`` as the single source of truth.

The supervised span of assistant message *k* is found by rendering twice with ``apply_chat_template``: the
messages before *k* with the generation prompt, and the messages up to *k* without it; the second must extend
the first, and the extension (reply plus whatever end-of-turn text the template writes) is trainable. A template
whose renders are not prefixes of each other (e.g. one that rewrites earlier turns) cannot be split this way and
raises `DataError` rather than guessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llavakit.data.schema import Conversation
from llavakit.data.templates.base import ChatTemplate, Segment, check_generation_turns
from llavakit.errors import ConfigError, DataError


@dataclass(frozen=True)
class TokenizerChatTemplate(ChatTemplate):
    """Delegates rendering to ``tokenizer.apply_chat_template``; the BOS is whatever that template writes."""

    add_bos: bool = False

    def render(
        self, conversation: Conversation, *, for_generation: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        check_generation_turns(conversation, self.id, for_generation)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "template 'tokenizer' needs a tokenizer with a chat_template; pick a named template"
            )
        # self.system is empty unless a system_prompt is configured; without one the tokenizer's template decides.
        system = conversation.system if conversation.system is not None else (self.system or None)
        messages = [] if system is None else [{"role": "system", "content": system}]
        segments, rendered = [], ""
        for turn in conversation.turns:
            if turn.role == "assistant":
                prompt = self._apply(tokenizer, messages, generation=True)
                rendered = self._extend(segments, rendered, prompt, trainable=False)
            messages.append({"role": turn.role, "content": turn.text})
            if turn.role == "assistant":
                full = self._apply(tokenizer, messages, generation=False)
                rendered = self._extend(segments, rendered, full, trainable=True)
        final = self._apply(tokenizer, messages, generation=for_generation)
        self._extend(segments, rendered, final, trainable=False)
        return segments

    def ignores_system_prompt(self) -> str | None:
        if not self.system:
            return (
                "an empty one sends no system message, so the tokenizer's chat_template picks its default; set a "
                "non-empty system prompt, or none"
            )
        return None

    @staticmethod
    def _apply(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    @staticmethod
    def _extend(segments: list[Segment], rendered: str, text: str, trainable: bool) -> str:
        if not text.startswith(rendered):
            raise DataError(
                "the tokenizer's chat_template renders earlier turns differently once later turns are added, so "
                "assistant spans cannot be located; use a named llavakit template instead"
            )
        if len(text) > len(rendered):
            segments.append(Segment(text[len(rendered) :], trainable))
        return text


TOKENIZER = TokenizerChatTemplate(id="tokenizer")
