"""``llava_llama_3``: the Llama-3-Instruct format used by LLaVA-NeXT's ``conv_llava_llama_3``.

Rendering equals Meta-Llama-3-Instruct's own chat template (which upstream calls through the gated tokenizer it
downloads at import time): ``<|begin_of_text|>`` then, per message, ``<|start_header_id|>ROLE<|end_header_id|>\\n\\n
text<|eot_id|>`` (text stripped, like the template's ``| trim``); the generation prompt is the assistant header.

Training reproduces upstream ``preprocess_llama3`` by default (``upstream_quirks=True``): the whole assistant
message is supervised, header included, and ``<|begin_of_text|>``, ``<|start_header_id|>``, ``<|end_header_id|>``
and ``<|eot_id|>`` are supervised everywhere. Upstream also lists ``"\\n\\n"`` among the tokens to unmask, but looks
it up with ``convert_tokens_to_ids("\\n\\n")``, which finds nothing in the byte-level vocabulary (the token is
spelled ``ĊĊ``), so it stays masked there and here. With ``upstream_quirks=False`` exactly ``reply + <|eot_id|>`` is
supervised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llavakit.data.schema import USER, Conversation
from llavakit.data.templates.base import ChatTemplate, Segment, check_generation_turns

BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
LLAVA_LLAMA_3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)


def header(role: str) -> str:
    """The message header of ``role`` (``<|start_header_id|>ROLE<|end_header_id|>\\n\\n``)."""
    return f"{START_HEADER}{role}{END_HEADER}\n\n"


@dataclass(frozen=True)
class Llama3Template(ChatTemplate):
    """Header/``<|eot_id|>`` messages after one ``<|begin_of_text|>``."""

    add_bos: bool = False

    def render(
        self, conversation: Conversation, *, for_generation: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        check_generation_turns(conversation, self.id, for_generation)
        system = self.system_prompt(conversation).strip()
        segments = [Segment(f"{BEGIN_OF_TEXT}{header('system')}{system}{EOT}", False)]
        for turn in conversation.turns:
            if turn.role == USER:
                segments.append(Segment(f"{header('user')}{turn.text.strip()}{EOT}", False))
            elif self.upstream_quirks:
                segments.append(Segment(f"{header('assistant')}{turn.text.strip()}{EOT}", True))
            else:
                segments.append(Segment(header("assistant"), False))
                segments.append(Segment(f"{turn.text.strip()}{EOT}", True))
        if for_generation:
            segments.append(Segment(header("assistant"), False))
        return segments

    def always_trained_tokens(self) -> tuple[str, ...]:
        return (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT) if self.upstream_quirks else ()


LLAVA_LLAMA_3 = Llama3Template(id="llava_llama_3", system=LLAVA_LLAMA_3_SYSTEM, stop_strings=(EOT,))
