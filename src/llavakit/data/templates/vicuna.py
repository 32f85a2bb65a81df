"""Vicuna-style templates: ``v0`` / ``llava_v0`` / ``llava_v0_mmtag`` (SINGLE separator) and ``vicuna_v1`` /
``llava_v1`` / ``llava_v1_mmtag`` (TWO separators).

Rendering equals upstream ``Conversation.get_prompt`` for ``conv_vicuna_v0``, ``conv_vicuna_v1``, ``conv_llava_v1``
and the ``llava_v0`` / ``*_mmtag`` siblings (which differ only in system prompt and few-shot context):
``SYSTEM<sep>ROLE: text<sep>ROLE: text<sep2>...``; a generation prompt ends with ``ASSISTANT:``.
The supervised span of each assistant turn is ``" " + reply + end-of-turn separator`` (``</s>`` for v1, ``###``
for v0): the space belongs to the reply because generation starts right after ``ASSISTANT:``.

Quirk kept (``v0``): upstream's ``conv_vicuna_v0`` carries a built-in few-shot exchange (an energy-sources Q&A)
that is part of every prompt; it is rendered as untrained context. (Upstream trains ``v0`` with a different
``### Human:`` format than it serves; llavakit trains and serves the one format of ``conversation.py``; the
same holds for ``llava_v0``.)

The ``*_mmtag`` templates render upstream ``get_prompt`` and write each ``<image>`` of a user turn as
``<Image><image></Image>``, as upstream's training does (``preprocess_multimodal``), in generation prompts too; see
`llavakit.data.templates.llama2` for where upstream's inference scripts and demo differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llavakit.data.schema import USER, Conversation
from llavakit.data.templates.base import ChatTemplate, Segment, check_generation_turns
from llavakit.data.templates.llama2 import MMTAG_NOTE, wrap_images

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# No space before the note: upstream's string literals are joined as written.
MMTAG_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant is able to understand "
    "the visual content that the user provides, and assist the user with a variety of tasks using natural language."
    + MMTAG_NOTE
)
V0_FEW_SHOT = (
    ("Human", "What are the key differences between renewable and non-renewable energy sources?"),
    (
        "Assistant",
        "Renewable energy sources are those that can be replenished naturally in a relatively "
        "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
        "Non-renewable energy sources, on the other hand, are finite and will eventually be "
        "depleted, such as coal, oil, and natural gas. Here are some key differences between "
        "renewable and non-renewable energy sources:\n"
        "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
        "energy sources are finite and will eventually run out.\n"
        "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
        "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
        "and other negative effects.\n"
        "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
        "have lower operational costs than non-renewable sources.\n"
        "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
        "locations than non-renewable sources.\n"
        "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
        "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
        "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
        "non-renewable sources are not, and their depletion can lead to economic and social instability.\n",
    ),
)


@dataclass(frozen=True)
class SeparatorTemplate(ChatTemplate):
    """``ROLE: text`` turns joined by separators (upstream SeparatorStyle SINGLE when ``sep2`` is empty, else TWO).

    Attributes:
        roles: (user role name, assistant role name).
        sep: separator after the system prompt and after user turns.
        sep2: separator after assistant turns (TWO style); empty means ``sep`` (SINGLE style).
        few_shot: (role name, text) pairs rendered after the system prompt as fixed context.
        mmtag: write images as ``<Image><image></Image>`` (`wrap_images`).
    """

    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = ""
    few_shot: tuple[tuple[str, str], ...] = ()
    mmtag: bool = False

    def render(
        self, conversation: Conversation, *, for_generation: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        check_generation_turns(conversation, self.id, for_generation)
        prefix = self.system_prompt(conversation) + self.sep
        # Upstream picks separators by message position, few-shot messages included.
        for position, (role_name, text) in enumerate(self.few_shot):
            prefix += f"{role_name}: {text}{self.sep_after(position)}"
        segments = [Segment(prefix, False)]
        for offset, turn in enumerate(conversation.turns):
            position = len(self.few_shot) + offset
            if turn.role == USER:
                text = wrap_images(turn.text, self.mmtag)
                segments.append(Segment(f"{self.roles[0]}: {text}{self.sep_after(position)}", False))
            else:
                segments.append(Segment(f"{self.roles[1]}:", False))
                segments.append(Segment(f" {turn.text}{self.sep_after(position)}", True))
        if for_generation:
            segments.append(Segment(f"{self.roles[1]}:", False))
        return segments

    def sep_after(self, position: int) -> str:
        """The separator after the message at ``position`` (few-shot messages counted)."""
        return self.sep2 if self.sep2 and position % 2 == 1 else self.sep


VICUNA_V0 = SeparatorTemplate(
    id="v0",
    system=LLAVA_V1_SYSTEM,
    roles=("Human", "Assistant"),
    sep="###",
    few_shot=V0_FEW_SHOT,
    stop_strings=("###",),
)
VICUNA_V1 = SeparatorTemplate(
    id="vicuna_v1", system=VICUNA_V1_SYSTEM, sep=" ", sep2="</s>", stop_strings=("</s>",)
)
LLAVA_V1 = SeparatorTemplate(
    id="llava_v1", system=LLAVA_V1_SYSTEM, sep=" ", sep2="</s>", stop_strings=("</s>",)
)
LLAVA_V0 = SeparatorTemplate(
    id="llava_v0", system=LLAVA_V1_SYSTEM, roles=("Human", "Assistant"), sep="###", stop_strings=("###",)
)
LLAVA_V0_MMTAG = SeparatorTemplate(
    id="llava_v0_mmtag",
    system=MMTAG_SYSTEM,
    roles=("Human", "Assistant"),
    sep="###",
    stop_strings=("###",),
    mmtag=True,
)
LLAVA_V1_MMTAG = SeparatorTemplate(
    id="llava_v1_mmtag", system=MMTAG_SYSTEM, sep=" ", sep2="</s>", stop_strings=("</s>",), mmtag=True
)
