"""LoRA on the LLM through peft; vision tower and projector train (or not) as the stage says.

Why: upstream applies LoRA to every ``nn.Linear`` except the projector and vision tower by filtering module names,
and forgets to save the non-LoRA trainables (the projector) in intermediate checkpoints (haotian-liu/LLaVA#844).
Here peft wraps only ``model.llm``; with LoRA on, the ``language_model`` part means the LoRA matrices only (upstream
``mm_tunable_parts`` semantics), and our checkpoints hold the whole model state, so every trainable tensor is saved
at every checkpoint. Export merges the adapters into the LLM weights (``merge_and_unload``).

QLoRA (``bits`` 4/8) needs the LLM loaded quantised by bitsandbytes; preflight rejects it with a clear error until
the model loader accepts a quantisation config. LoRA under FSDP2 is rejected the same way (DDP or single only).
"""

from __future__ import annotations

from torch import nn

from llavakit.model.llava_next import LlavaNextModel
from llavakit.training.config import LoraConfig


def apply_lora(model: LlavaNextModel, config: LoraConfig) -> None:
    """Replace ``model.llm`` by a peft LoRA model (in place); base LLM weights become frozen.

    ``config.bits`` must be 16 (checked by `llavakit.training.model_setup.preflight`).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    model.llm = get_peft_model(model.llm, peft_config)


def restrict_llm_to_lora(model: nn.Module, train_language_model: bool) -> None:
    """Within ``llm``, only LoRA matrices train, and only when the stage trains the language model."""
    for name, param in model.named_parameters():
        if name.startswith("llm."):
            param.requires_grad_(train_language_model and "lora_" in name)


def merge_lora(model: LlavaNextModel) -> LlavaNextModel:
    """Fold LoRA adapters into the LLM weights (in place) so the export is a plain llava-hf model."""
    if hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()
    return model
