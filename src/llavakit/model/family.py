"""LLM families as data: what differs between Llama, Mistral, Qwen2, Gemma... is a record, not a subclass.

Upstream LLaVA keeps one model subclass per LLM (``llava_llama.py``, ``llava_qwen.py``, ...) and picks one by
substrings of the model path. Here every causal LM is loaded through ``AutoModelForCausalLM`` and the few facts
that differ are looked up by the config's ``model_type`` — a field of the checkpoint, never its folder name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llavakit.errors import ConfigError


@dataclass(frozen=True)
class LLMFamily:
    """Facts about one LLM family that the rest of llavakit needs.

    Attributes:
        model_type: transformers ``config.model_type`` (the lookup key).
        default_template: chat template id used when a run names none.
        padding_side: side upstream pads training batches on (recorded in the checkpoint).
        pad_policy: where the pad token comes from when the tokenizer has none: ``"unk"`` (Vicuna/Llama-2 upstream),
            ``"eos"``, or ``"existing"`` (the tokenizer already has one, e.g. Qwen's ``<|endoftext|>``).
        adds_bos: whether the tokenizer prepends a BOS token to every encoding.
    """

    model_type: str
    default_template: str
    padding_side: str = "right"
    pad_policy: str = "unk"
    adds_bos: bool = True


FAMILIES: dict[str, LLMFamily] = {
    family.model_type: family
    for family in (
        LLMFamily("llama", default_template="vicuna_v1"),
        LLMFamily("mistral", default_template="mistral_instruct", padding_side="left"),
        LLMFamily("mixtral", default_template="mistral_instruct", padding_side="left"),
        LLMFamily("qwen2", default_template="qwen_2", pad_policy="existing", adds_bos=False),
        LLMFamily("qwen2_moe", default_template="qwen_2", pad_policy="existing", adds_bos=False),
        LLMFamily("qwen3", default_template="qwen_2_5", pad_policy="existing", adds_bos=False),
        LLMFamily("gemma", default_template="gemma_instruct", pad_policy="existing"),
        LLMFamily("gemma2", default_template="gemma_instruct", pad_policy="existing"),
    )
}

# Any other causal LM still works: it gets this record (its tokenizer's own chat template, right padding).
GENERIC = LLMFamily("generic", default_template="tokenizer", pad_policy="eos")


def family_for(model_type: str) -> LLMFamily:
    """The family record of a transformers ``model_type`` (the generic record for unlisted families)."""
    return FAMILIES.get(model_type, GENERIC)


def set_pad_token(tokenizer: Any, family: LLMFamily) -> None:
    """Give ``tokenizer`` a pad token per the family's policy when it has none (upstream pads Vicuna with unk)."""
    if tokenizer.pad_token is not None:
        return
    source = tokenizer.unk_token if family.pad_policy == "unk" and tokenizer.unk_token is not None else tokenizer.eos_token
    if source is None:
        raise ConfigError("the tokenizer has no pad, unk or eos token to pad batches with; set tokenizer.pad_token")
    tokenizer.pad_token = source
