"""The `Strategy` contract: how a model is placed, wrapped, run in (mixed) precision and clipped.

Why: the trainer is written once; whether the model runs in one process, under DDP or sharded with FSDP2 is a
`Strategy` chosen by id from `STRATEGIES`. A strategy touches the model only from outside (``wrap``), using the
units the model declares in ``model.shard_units()``; the model never imports distributed code.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn

from llavakit.distributed import DistContext
from llavakit.registry import Registry
from llavakit.training.config import StrategyConfig

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


class Strategy(ABC):
    """Wraps a model for training and owns the precision and gradient-sync policy.

    Args:
        config: the run's strategy section.
        context: this process's rank, world size and device.
    """

    #: Whether the strategy needs a process group even in a single process.
    needs_process_group = False

    def __init__(self, config: StrategyConfig, context: DistContext) -> None:
        self.config = config
        self.context = context

    def prepare(self, model: nn.Module) -> nn.Module:
        """Compile the shard units when asked, then `wrap` the model; returns the module to train."""
        if self.config.compile:
            for unit in model.shard_units():
                unit.compile()
        return self.wrap(model)

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device and wrap it; parameter names must stay the model's own (or ``module.``)."""

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast around forward when ``mixed_precision == "bf16"`` (FSDP2 overrides: it casts params)."""
        enabled = self.config.mixed_precision == "bf16"
        with torch.autocast(device_type=self.context.device.type, dtype=torch.bfloat16, enabled=enabled):
            yield

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """Turn gradient all-reduce off for all but the last micro-batch of an accumulation window.

        A single process has nothing to synchronise; DDP and FSDP2 override this.
        """
        return None

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip the gradients of ``model`` to ``max_norm`` (0 = only measure) and return the total norm."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return float(_full(norm))

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model as built (the module whose ``save_pretrained`` and submodules we use)."""
        return model


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 returns the norm as a DTensor; gather it to a plain tensor.
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def build_strategy(config: StrategyConfig, context: DistContext) -> Strategy:
    """Instantiate the strategy registered under ``config.name``."""
    return STRATEGIES.get(config.name)(config, context)
