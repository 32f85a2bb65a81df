"""DistributedDataParallel: every rank holds the whole model; gradients are averaged after backward.

Relies on the model freezing its never-used parameters (vision layers after the selected one, ``post_layernorm``)
and running a dummy vision pass on text-only batches, so ``find_unused_parameters`` stays off (it costs a graph
traversal per step and hides bugs).
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from llavakit.training.strategies.base import STRATEGIES, Strategy


@STRATEGIES.register("ddp")
class DDPStrategy(Strategy):
    """DDP over the default process group (gloo on CPU, NCCL on CUDA)."""

    needs_process_group = True

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move to the device and wrap in `DistributedDataParallel`."""
        model = model.to(self.context.device)
        device_ids = [self.context.device.index] if self.context.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """The flag DDP's ``no_sync()`` context toggles, set explicitly for the accumulation loop."""
        model.require_backward_grad_sync = enabled

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The module inside DDP."""
        return model.module
