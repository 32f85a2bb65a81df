"""Optimizer parameter groups and the learning-rate schedule.

Why: LLaVA's recipes give the vision tower and the projector their own learning rates (upstream
``mm_vision_tower_lr`` / ``mm_projector_lr`` in ``LLaVATrainer.create_optimizer``) and never decay biases or norms.
We build one AdamW group per (part, decay) pair, each named ``"<part>/decay"`` or ``"<part>/no_decay"`` so logs and
tests can see which learning rate every parameter gets. The schedule is transformers' ``get_scheduler`` (the one
upstream's HF Trainer used), so warmup and cosine match upstream step for step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from transformers import get_scheduler

from llavakit.training.config import OptimConfig
from llavakit.training.stages import part_of

_SCHEDULER_IDS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def part_learning_rate(part: str, config: OptimConfig) -> float:
    """The learning rate of one trainable part (a part without its own rate uses ``config.lr``)."""
    specific = {"vision_tower": config.vision_tower_lr, "projector": config.projector_lr}.get(part)
    return config.lr if specific is None else specific


def uses_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Weight decay only on matrices: biases, norm scales, ``image_newline`` (all 1-D) get none."""
    return param.ndim >= 2 and not name.endswith(".bias")


def build_param_groups(named_params: Iterable[tuple[str, nn.Parameter]], config: OptimConfig) -> list[dict]:
    """Split the trainable parameters into named AdamW groups.

    Args:
        named_params: ``model.named_parameters()`` of the (possibly wrapped) model; frozen ones are skipped.
        config: the stage's optimizer config.

    Returns:
        Groups with keys ``name`` (``"<part>/decay"``), ``params``, ``lr``, ``weight_decay``; empty groups dropped.
    """
    groups: dict[str, dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        clean = _strip_wrapper_prefixes(name)
        part = part_of(clean)
        decay = uses_weight_decay(clean, param)
        key = f"{part}/{'decay' if decay else 'no_decay'}"
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "lr": part_learning_rate(part, config),
                "weight_decay": config.weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
    return list(groups.values())


def _strip_wrapper_prefixes(name: str) -> str:
    # DDP adds "module.", torch.compile "_orig_mod."; FSDP2 and peft keep the module names.
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `build_param_groups` of ``model``."""
    groups = build_param_groups(model.named_parameters(), config)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=config.fused)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length as HF TrainingArguments computes it: ``ceil(total * ratio)``."""
    return math.ceil(total_steps * warmup_ratio)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then ``config.schedule`` decay to 0 over ``total_steps`` optimizer steps."""
    return get_scheduler(
        _SCHEDULER_IDS[config.schedule],
        optimizer,
        num_warmup_steps=warmup_steps(total_steps, config.warmup_ratio),
        num_training_steps=total_steps,
    )
