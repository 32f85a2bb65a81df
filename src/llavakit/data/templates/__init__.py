"""Chat templates as registered values: ``TEMPLATES.get(id)`` or `get_template` (with the quirk switch).

Ids: every conversation template id of upstream LLaVA and LLaVA-NeXT (``plain``, ``v0``, ``llava_v0``,
``vicuna_v1``, ``llava_v1``, the ``*_mmtag`` variants, ``llama_2``, ``llava_llama_2``, ``llava_llama_2_simple``,
``mistral_instruct``, ``chatml_direct``, ``mpt``, ``mistral_orca``, ``mistral_zephyr``, ``qwen_1_5``, ``qwen_2``,
``qwen_2_5``, ``llava_llama_3``, ``gemma_instruct``, ...), upstream's other names for them (`ALIASES`: ``v1``,
``default``, ``v0_plain``, ``mistral_direct``, ...; they resolve to the template they name, whose own id is what a
checkpoint records), ``tokenizer`` (the tokenizer's own ``chat_template``) and ``processor`` (the chat template a
transformers / llava-hf checkpoint carries). See
`llavakit.data.templates.base` for the segment contract, and `llavakit.data.templates.jinja` for the Jinja export
that lets other servers prompt a checkpoint the same way.
"""

from __future__ import annotations

from dataclasses import replace

from llavakit.data.templates.base import ChatTemplate, Segment
from llavakit.data.templates.chatml import (
    CHATML_DIRECT,
    MISTRAL_ORCA,
    MISTRAL_ZEPHYR,
    MPT,
    QWEN_1_5,
    QWEN_2,
    QWEN_2_5,
)
from llavakit.data.templates.gemma import GEMMA_INSTRUCT
from llavakit.data.templates.hf_chat import PROCESSOR, TOKENIZER
from llavakit.data.templates.llama2 import (
    LLAMA_2,
    LLAVA_LLAMA_2,
    LLAVA_LLAMA_2_MMTAG,
    LLAVA_LLAMA_2_SIMPLE,
    MISTRAL_INSTRUCT,
)
from llavakit.data.templates.llama3 import LLAVA_LLAMA_3
from llavakit.data.templates.plain import PLAIN
from llavakit.data.templates.vicuna import (
    LLAVA_V0,
    LLAVA_V0_MMTAG,
    LLAVA_V1,
    LLAVA_V1_MMTAG,
    VICUNA_V0,
    VICUNA_V1,
)
from llavakit.errors import ConfigError
from llavakit.registry import Registry

TEMPLATES: Registry[ChatTemplate] = Registry("chat template")
for _template in (
    PLAIN,
    VICUNA_V0,
    LLAVA_V0,
    LLAVA_V0_MMTAG,
    VICUNA_V1,
    LLAVA_V1,
    LLAVA_V1_MMTAG,
    LLAMA_2,
    LLAVA_LLAMA_2,
    LLAVA_LLAMA_2_SIMPLE,
    LLAVA_LLAMA_2_MMTAG,
    MISTRAL_INSTRUCT,
    CHATML_DIRECT,
    MPT,
    MISTRAL_ORCA,
    MISTRAL_ZEPHYR,
    QWEN_1_5,
    QWEN_2,
    QWEN_2_5,
    LLAVA_LLAMA_3,
    GEMMA_INSTRUCT,
    TOKENIZER,
    PROCESSOR,
):
    TEMPLATES.register(_template.id, _template)

# Upstream's other names for the same templates (``conv_templates`` keys of LLaVA and LLaVA-NeXT), accepted wherever
# a template id is; the template they resolve to keeps its own id.
ALIASES = {
    "default": "v0",
    "v1": "vicuna_v1",
    "v0_plain": "plain",
    "v0_mmtag": "llava_v0_mmtag",
    "v1_mmtag": "llava_v1_mmtag",
    "llava_mistral_instruct": "mistral_instruct",
    "mistral_direct": "chatml_direct",
}
for _alias, _target in ALIASES.items():
    TEMPLATES.register(_alias, TEMPLATES.get(_target))


def get_template(
    template_id: str, upstream_quirks: bool = True, system_prompt: str | None = None
) -> ChatTemplate:
    """The registered template ``template_id``.

    Args:
        template_id: registry id.
        upstream_quirks: False selects the fixed training behaviour.
        system_prompt: replaces the template's default system prompt (a sample's own system turn still wins);
            None keeps the default.
    """
    template = replace(TEMPLATES.get(template_id), upstream_quirks=upstream_quirks)
    return template if system_prompt is None else replace(template, system=system_prompt)


def check_system_prompt(template: ChatTemplate, where: str = "system_prompt") -> None:
    """Raise `ConfigError` naming ``where`` if ``template`` (holding a configured system prompt) would not train
    with it (`ChatTemplate.ignores_system_prompt`)."""
    reason = template.ignores_system_prompt()
    if reason is not None:
        raise ConfigError(
            f"{where}: template {template.id!r} ignores a configured system prompt in training: {reason}"
        )


__all__ = ["ALIASES", "TEMPLATES", "ChatTemplate", "Segment", "check_system_prompt", "get_template"]
