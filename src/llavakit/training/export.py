"""Final export of a trained stage: the transformers-loadable model folder, plus upstream's ``mm_projector.bin``.

Why: a stage's output must load in `LlavaNextModel.from_pretrained` (next stage, inference) and in transformers'
``LlavaNextForConditionalGeneration``; an align stage must also produce upstream's projector-only artifact so
upstream scripts (``--pretrain_mm_mlp_adapter``) can consume it. Under FSDP2 the weights are sharded DTensors: they
are gathered to rank 0's CPU and written through a fresh skeleton of the same model. LoRA adapters are merged into
the LLM first. The folder is written under a temporary name and swapped in by renames (`_swap_in`).

A LoRA stage also writes its adapters alone to ``<out_dir>/adapter/`` (`llavakit.training.lora.save_adapter`):
peft's ``adapter_config.json`` + ``adapter_model.safetensors``, which ``PeftModel.from_pretrained(llm, folder)``
loads onto the LLM the stage started from. Under FSDP2 the gathered state is loaded into a skeleton with the same
peft wrapping (its config taken from the trained model), so both artifacts come from one gathered copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from llavakit.distributed import DistContext, barrier
from llavakit.model.llava_next import LlavaNextModel
from llavakit.model.projector import upstream_projector_state
from llavakit.training.lora import ADAPTER_DIR, merge_lora, peft_skeleton, save_adapter

UPSTREAM_PROJECTOR_FILE = "mm_projector.bin"


def export_model(
    model: nn.Module, unwrapped: LlavaNextModel, out_dir: Path, context: DistContext, write_projector: bool
) -> Path:
    """Write ``out_dir`` (collective: every rank calls it; rank 0 writes).

    Args:
        model: the trained module as wrapped by the strategy.
        unwrapped: the `LlavaNextModel` inside it.
        out_dir: the export folder (``<stage_dir>/final``).
        write_projector: also write upstream's ``mm_projector.bin`` into ``out_dir``.

    With LoRA, ``unwrapped`` (unsharded runs) has its adapters merged in place: export only after training.

    Returns:
        ``out_dir``.
    """
    sharded = any(isinstance(param, DTensor) for param in model.parameters())
    full_state = (
        get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if sharded
        else None
    )
    if context.is_main:
        trained = _plain_copy(unwrapped, full_state) if sharded else unwrapped
        partial = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        save_adapter(trained, partial / ADAPTER_DIR)
        plain = merge_lora(trained)
        plain.save_pretrained(partial)
        if write_projector:
            torch.save(upstream_projector_state(plain.projector), partial / UPSTREAM_PROJECTOR_FILE)
        _swap_in(partial, out_dir)
    barrier(context)
    return out_dir


def _swap_in(partial: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the complete ``partial`` folder without a moment where neither exists.

    An earlier export is first renamed aside, then ``partial`` takes its name, then the old one is deleted: a
    process killed in between leaves either the old export or the new one under ``out_dir`` (or, killed right
    between the two renames, the old one under ``<name>.old``), never a half-written or deleted-before-written one.
    """
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    partial.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _plain_copy(unwrapped: LlavaNextModel, full_state: dict[str, torch.Tensor]) -> LlavaNextModel:
    """A fresh unsharded model (LoRA-wrapped like ``unwrapped`` when it is) holding ``full_state``."""
    skeleton = LlavaNextModel.from_config(unwrapped.config, tokenizer=unwrapped.tokenizer)
    peft_skeleton(skeleton, unwrapped)
    skeleton.load_state_dict(full_state)
    return skeleton
