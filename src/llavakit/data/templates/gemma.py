"""``gemma_instruct``: Gemma's turn format (upstream SeparatorStyle GEMMA).

Rendering equals upstream ``get_prompt``: ``<start_of_turn>user\\nQ<end_of_turn>\\n<start_of_turn>model\\nA
<end_of_turn>\\n``, after the tokenizer's ``<bos>``. Gemma has no system role: a sample with a system turn is an
error rather than a silently dropped prompt. Supervised per assistant turn: ``reply + <end_of_turn>\\n`` (upstream's
separator, two tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llavakit.data.schema import USER, Conversation
from llavakit.data.templates.base import ChatTemplate, Segment, check_generation_turns
from llavakit.errors import DataError

END_OF_TURN = "<end_of_turn>"


@dataclass(frozen=True)
class GemmaTemplate(ChatTemplate):
    """``<start_of_turn>ROLE\\n ... <end_of_turn>\\n`` turns; the assistant role is ``model``."""

    def render(
        self, conversation: Conversation, *, for_generation: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        check_generation_turns(conversation, self.id, for_generation)
        if conversation.system is not None:
            raise DataError(f"template {self.id} has no system role; remove the sample's system turn")
        segments = []
        for turn in conversation.turns:
            if turn.role == USER:
                segments.append(Segment(f"<start_of_turn>user\n{turn.text}{END_OF_TURN}\n", False))
            else:
                segments.append(Segment("<start_of_turn>model\n", False))
                segments.append(Segment(f"{turn.text}{END_OF_TURN}\n", True))
        if for_generation:
            segments.append(Segment("<start_of_turn>model\n", False))
        return segments

    def ignores_system_prompt(self) -> str | None:
        return "Gemma has no system role; remove the setting"


GEMMA_INSTRUCT = GemmaTemplate(id="gemma_instruct", stop_strings=(END_OF_TURN,))
