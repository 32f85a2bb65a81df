"""The `Strategy` contract: how a model is placed, wrapped, run in (mixed) precision, clipped and stepped.

Why: the trainer is written once; whether the model runs in one process, under DDP or sharded with FSDP2 is a
`Strategy` chosen by id from `STRATEGIES`. A strategy touches the model only from outside (``wrap``), using the
units the model declares in ``model.shard_units()``; the model never imports distributed code.

fp16 (GPUs before Ampere have no bf16): float16's range ends at 65504 and small gradients flush to zero, so the loss
is multiplied by a dynamic scale before backward (`torch.amp.GradScaler`, one per strategy, for every strategy:
under FSDP2 the gradients are DTensors and DTensor's handler of the inf check all-reduces the "found inf" flag over
the mesh itself, which is what FSDP1's ``ShardedGradScaler`` added; PyTorch's own FSDP2 tests use the plain one).
The gradients are unscaled before clipping, so the norm reported and clipped is the true one. A step whose
gradients hold an inf/NaN (an overflow) is skipped and the scale halved; after 2000 clean steps it doubles again
(torch's defaults; DeepSpeed's ``initial_scale_power: 16`` starts at the same 2**16). What the trainer does with
a skipped step (counted, the LR schedule held, as HF Trainer and DeepSpeed do) is in `llavakit.training.trainer`.
The trainable parameters must be float32 (fp32 master weights): the scaler refuses to unscale fp16 gradients, and
fp16 updates of fp16 weights lose small steps.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn

from llavakit.distributed import DistContext
from llavakit.errors import ConfigError
from llavakit.registry import Registry
from llavakit.training.config import StrategyConfig

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
# strategy.mixed_precision → the autocast / FSDP2 compute dtype (None: float32, no autocast).
COMPUTE_DTYPES: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: An overflow that would take the fp16 loss scale below this stops training (DeepSpeed's ``min_loss_scale``: 1):
#: gradients that overflow float16 even unscaled are a diverged run, not a scale to find.
MIN_LOSS_SCALE = 1.0


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
        #: The fp16 dynamic loss scaler (None unless ``mixed_precision == "fp16"``); saved with checkpoints.
        self.grad_scaler = (
            torch.amp.GradScaler(context.device.type) if config.mixed_precision == "fp16" else None
        )

    def prepare(self, model: nn.Module) -> nn.Module:
        """Compile the shard units when asked, then `wrap` the model; returns the module to train.

        Raises:
            ConfigError: fp16 with trainable parameters that are not float32 (see module docstring).
        """
        if self.grad_scaler is not None:
            _require_fp32_trainable(model)
        if self.config.compile:
            for unit in model.shard_units():
                unit.compile()
        return self.wrap(model)

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device and wrap it; parameter names must stay the model's own (or ``module.``)."""

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16/fp16 autocast around forward per ``mixed_precision`` (FSDP2 overrides: it casts params)."""
        dtype = COMPUTE_DTYPES[self.config.mixed_precision]
        with torch.autocast(
            device_type=self.context.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
        ):
            yield

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The tensor to call ``backward`` on: ``loss`` times the fp16 loss scale (``loss`` itself otherwise)."""
        return loss if self.grad_scaler is None else self.grad_scaler.scale(loss)

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale (fp16; before clipping) and record whether any is inf/NaN."""
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(optimizer)

    def loss_scale(self) -> float:
        """The current fp16 loss scale (1.0 without a scaler); a host sync."""
        return 1.0 if self.grad_scaler is None else self.grad_scaler.get_scale()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, grad_norm: float) -> bool:
        """Apply the update unless an fp16 overflow made ``grad_norm`` non-finite; returns whether it was applied.

        Without a scaler the caller handles a non-finite norm (it stops training) before calling this. With one, a
        non-finite (global, unscaled) norm skips the update and lowers the scale; the norm, not the scaler's own
        flag, decides, so every rank skips the same steps and a NaN that clipping spread is never applied.
        """
        if self.grad_scaler is None:
            optimizer.step()
            return True
        applied = math.isfinite(grad_norm)
        if applied:
            self.grad_scaler.step(optimizer)
        self.grad_scaler.update()
        return applied

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


def _require_fp32_trainable(model: nn.Module) -> None:
    """fp16 needs float32 master weights: refuse trainable parameters of another dtype, naming the fix."""
    other = {
        str(param.dtype)
        for param in model.parameters()
        if param.requires_grad and param.dtype != torch.float32
    }
    if other:
        raise ConfigError(
            f"strategy.mixed_precision=fp16 trains float32 master weights, but trainable parameters are "
            f"{', '.join(sorted(other))} (a checkpoint saved in half precision, loaded with strategy.param_dtype=auto): "
            "set strategy.param_dtype=fp32"
        )


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 returns the norm as a DTensor; gather it to a plain tensor.
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def build_strategy(config: StrategyConfig, context: DistContext) -> Strategy:
    """Instantiate the strategy registered under ``config.name``."""
    return STRATEGIES.get(config.name)(config, context)
