"""``[INST]`` templates: ``llama_2``, ``mistral_instruct`` and the ``llava_llama_2*`` family (upstream SeparatorStyle
LLAMA_2).

Rendering equals upstream ``get_prompt``: ``[INST] <<SYS>>\\nSYSTEM\\n<</SYS>>\\n\\nQ [/INST] A </s><s>[INST] Q2
[/INST] A2 </s>`` (no ``<<SYS>>`` block when the system prompt is empty, as for Mistral; Mistral's ``sep`` is empty
so later rounds start directly with ``[INST]``). The leading ``<s>`` is the tokenizer's BOS (``add_bos``).
Supervised per assistant turn: ``" " + reply + " </s>"``. ``llava_llama_2``, ``llava_llama_2_simple`` and
``llava_llama_2_mmtag`` are ``llama_2`` with LLaVA's system prompts. (Upstream's ``llava_mistral_instruct`` is
``mistral_instruct`` under another name.)

``*_mmtag`` templates (here and in `llavakit.data.templates.vicuna`) show each image as ``<Image><image></Image>``
(`wrap_images`), the format their system prompt announces and upstream's training writes (haotian-liu/LLaVA
``preprocess_multimodal``). llavakit wraps in generation prompts too, so a model is prompted as it was trained and
the exported chat template has one format. Upstream's own inference does not agree with its training here: its
evaluation and CLI scripts (``model_vqa*``, ``run_llava``, ``serve/cli``) write a plain ``<image>\n`` before the
question, and its Gradio demo prepends a ``<Image><image></Image>`` / ``Received.`` exchange instead. (LLaVA-NeXT's
``preprocess_multimodal`` wraps only an image it moved to the front of its turn, so an ``<image>``-first turn
stays unwrapped there; llavakit follows LLaVA, where the mmtag checkpoints come from.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llavakit.data.formats import IMAGE_PLACEHOLDER
from llavakit.data.schema import USER, Conversation
from llavakit.data.templates.base import ChatTemplate, Segment, check_generation_turns

LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)

LLAVA_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
LLAVA_SIMPLE_SYSTEM = "Answer the questions about the visual content that the user provides."
MMTAG_NOTE = "The visual content will be provided with the following format: <Image>visual content</Image>."
MMTAG_IMAGE = f"<Image>{IMAGE_PLACEHOLDER}</Image>"


def wrap_images(text: str, mmtag: bool) -> str:
    """``text`` with every image placeholder written as ``<Image><image></Image>`` when ``mmtag``."""
    return text.replace(IMAGE_PLACEHOLDER, MMTAG_IMAGE) if mmtag else text


@dataclass(frozen=True)
class InstTemplate(ChatTemplate):
    """``[INST] ... [/INST]`` rounds.

    Attributes:
        sep: text before every round but the first (``<s>`` for Llama-2, empty for Mistral).
        sep2: end-of-turn marker after each reply (``</s>``).
        mmtag: write images as ``<Image><image></Image>`` (`wrap_images`).
    """

    sep: str = "<s>"
    sep2: str = "</s>"
    mmtag: bool = False

    def render(
        self, conversation: Conversation, *, for_generation: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        check_generation_turns(conversation, self.id, for_generation)
        system = self.system_prompt(conversation)
        segments = []
        for number, turn in enumerate(conversation.turns):
            if turn.role == USER:
                text = wrap_images(turn.text, self.mmtag)
                if number == 0 and system:
                    text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
                opener = self.sep if number else ""
                segments.append(Segment(f"{opener}[INST] {text} [/INST]", False))
            else:
                segments.append(Segment(f" {turn.text} {self.sep2}", True))
        return segments


LLAMA_2 = InstTemplate(id="llama_2", system=LLAMA_2_SYSTEM, stop_strings=("</s>",))
MISTRAL_INSTRUCT = InstTemplate(id="mistral_instruct", system="", sep="", stop_strings=("</s>",))
LLAVA_LLAMA_2 = InstTemplate(id="llava_llama_2", system=LLAVA_SYSTEM, stop_strings=("</s>",))
LLAVA_LLAMA_2_SIMPLE = InstTemplate(
    id="llava_llama_2_simple", system=LLAVA_SIMPLE_SYSTEM, stop_strings=("</s>",)
)
# No space between the sentences: upstream's string literals are joined as written.
LLAVA_LLAMA_2_MMTAG = InstTemplate(
    id="llava_llama_2_mmtag", system=LLAVA_SIMPLE_SYSTEM + MMTAG_NOTE, stop_strings=("</s>",), mmtag=True
)
