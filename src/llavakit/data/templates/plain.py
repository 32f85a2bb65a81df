"""``plain``: the projector-pretraining format (upstream ``conv_llava_plain`` + ``preprocess_plain``).

The user text is discarded and replaced by the image placeholders alone; the sequence is
``<image>caption\\n`` after the tokenizer's BOS, and only ``caption\\n`` is supervised (no EOS), as upstream
trains LCS-558K. A generation prompt is the placeholders alone, matching what the model saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llavakit.data.formats import IMAGE_PLACEHOLDER
from llavakit.data.schema import Conversation
from llavakit.data.templates.base import ChatTemplate, Segment, check_generation_turns
from llavakit.errors import DataError


@dataclass(frozen=True)
class PlainTemplate(ChatTemplate):
    """Image placeholders followed by the caption."""

    sep: str = "\n"

    def render(
        self, conversation: Conversation, *, for_generation: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        check_generation_turns(conversation, self.id, for_generation)
        turns = conversation.turns
        expected = 1 if for_generation else 2
        if len(turns) != expected:
            raise DataError(
                f"template plain needs exactly one user turn (with the image) and one caption turn, got {len(turns)} "
                "turns; use a chat template for multi-turn data"
            )
        placeholders = turns[0].text.count(IMAGE_PLACEHOLDER)
        if not placeholders:
            raise DataError("template plain needs an image: the user turn has no <image> placeholder")
        segments = [Segment(IMAGE_PLACEHOLDER * placeholders, False)]
        if not for_generation:
            segments.append(Segment(turns[1].text + self.sep, True))
        return segments

    def ignores_system_prompt(self) -> str | None:
        return "the plain (projector-pretraining) format has no system prompt; remove the setting from this stage"


PLAIN = PlainTemplate(id="plain")
