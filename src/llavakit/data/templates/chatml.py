"""ChatML templates: the upstream MPT style (``chatml_direct``, ``mpt``, ``mistral_orca``, ``mistral_zephyr``) and
``qwen_1_5`` / ``qwen_2`` / ``qwen_2_5`` (CHATML).

``chatml_direct`` (llava-v1.6-34b) renders ``<|im_start|>system\\nAnswer the questions.<|im_end|><|im_start|>user\\n
Q<|im_end|><|im_start|>assistant\\nA<|im_end|>`` with no newline after ``<|im_end|>``, exactly as upstream
``get_prompt``; supervised per assistant turn: ``reply + <|im_end|>``. ``mpt`` and ``mistral_orca`` differ only in
their system prompt; ``mistral_zephyr`` writes Zephyr's ``<|system|>`` / ``<|user|>`` / ``<|assistant|>`` headers
and ends messages with ``</s>``. (Upstream's ``mistral_direct`` is ``chatml_direct`` under another name.)

The Qwen templates render ``<|im_start|>ROLE\\ntext<|im_end|>\\n`` per message. Training reproduces upstream
LLaVA-NeXT ``preprocess_qwen`` by default (``upstream_quirks=True``):

- the default system prompt is hard-coded to "You are a helpful assistant." whatever the template says, so
  ``qwen_2_5``'s "You are Qwen, created by Alibaba Cloud..." appears only at inference (``for_generation=True``);
  a sample's own system turn replaces it in both cases;
- the whole assistant message is supervised, header ``<|im_start|>assistant\\n`` and trailing ``\\n`` included;
- the tokens ``<|im_start|>``, ``<|im_end|>`` and ``\\n`` are supervised everywhere, user and system turns too.

With ``upstream_quirks=False`` training uses the template's own system prompt and supervises exactly
``reply + <|im_end|>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llavakit.data.schema import USER, Conversation
from llavakit.data.templates.base import ChatTemplate, Segment, check_generation_turns

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
QWEN_TRAINING_SYSTEM = "You are a helpful assistant."
QWEN_2_5_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclass(frozen=True)
class MptTemplate(ChatTemplate):
    """Messages without newlines between them (upstream SeparatorStyle MPT): ``HEADER system SEP`` then
    ``ROLE text SEP`` per turn.

    Attributes:
        system_header: text before the system prompt (upstream keeps it inside its ``system`` string).
        roles: (user header, assistant header), each ending in a newline.
        sep: end-of-message marker.
    """

    system_header: str = f"{IM_START}system\n"
    roles: tuple[str, str] = (f"{IM_START}user\n", f"{IM_START}assistant\n")
    sep: str = IM_END

    def render(
        self, conversation: Conversation, *, for_generation: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        check_generation_turns(conversation, self.id, for_generation)
        segments = [Segment(f"{self.system_header}{self.system_prompt(conversation)}{self.sep}", False)]
        for turn in conversation.turns:
            if turn.role == USER:
                segments.append(Segment(f"{self.roles[0]}{turn.text}{self.sep}", False))
            else:
                segments.append(Segment(self.roles[1], False))
                segments.append(Segment(f"{turn.text}{self.sep}", True))
        if for_generation:
            segments.append(Segment(self.roles[1], False))
        return segments


@dataclass(frozen=True)
class QwenTemplate(ChatTemplate):
    """ChatML with a newline after every message (upstream SeparatorStyle CHATML + ``preprocess_qwen``)."""

    add_bos: bool = False

    def render(
        self, conversation: Conversation, *, for_generation: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        check_generation_turns(conversation, self.id, for_generation)
        quirks = self.upstream_quirks and not for_generation
        default = QWEN_TRAINING_SYSTEM if quirks else self.system
        system = default if conversation.system is None else conversation.system
        segments = [Segment(f"{IM_START}system\n{system}{IM_END}\n", False)]
        for turn in conversation.turns:
            if turn.role == USER:
                segments.append(Segment(f"{IM_START}user\n{turn.text}{IM_END}\n", False))
            elif quirks:
                segments.append(Segment(f"{IM_START}assistant\n{turn.text}{IM_END}\n", True))
            else:
                segments.append(Segment(f"{IM_START}assistant\n", False))
                segments.append(Segment(f"{turn.text}{IM_END}", True))
                segments.append(Segment("\n", False))
        if for_generation:
            segments.append(Segment(f"{IM_START}assistant\n", False))
        return segments

    def always_trained_tokens(self) -> tuple[str, ...]:
        return (IM_START, IM_END, "\n") if self.upstream_quirks else ()

    def ignores_system_prompt(self) -> str | None:
        if self.upstream_quirks:
            return (
                f"upstream's Qwen training hard-codes {QWEN_TRAINING_SYSTEM!r}; remove the setting, or give the samples "
                "system turns of their own (those are kept)"
            )
        return None


CHATML_DIRECT = MptTemplate(id="chatml_direct", system="Answer the questions.", stop_strings=(IM_END,))
MPT = MptTemplate(
    id="mpt",
    system=(
        "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
    ),
    stop_strings=(IM_END,),
)
MISTRAL_ORCA = MptTemplate(
    id="mistral_orca",
    system=(
        "You are MistralOrca, a large language model trained by Alignment Lab AI. Write out your reasoning "
        "step-by-step to be sure you get the right answers!"
    ),
    stop_strings=(IM_END,),
)
MISTRAL_ZEPHYR = MptTemplate(
    id="mistral_zephyr",
    system="You are a helpful AI assistant.",
    system_header="<|system|>\n",
    roles=("<|user|>\n", "<|assistant|>\n"),
    sep="</s>",
    stop_strings=("</s>",),
)
QWEN_1_5 = QwenTemplate(id="qwen_1_5", system=QWEN_TRAINING_SYSTEM, stop_strings=(IM_END,))
QWEN_2 = QwenTemplate(id="qwen_2", system=QWEN_TRAINING_SYSTEM, stop_strings=(IM_END,))
QWEN_2_5 = QwenTemplate(id="qwen_2_5", system=QWEN_2_5_SYSTEM, stop_strings=(IM_END,))
