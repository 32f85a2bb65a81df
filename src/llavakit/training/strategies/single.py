"""One process, one device: the model is only moved to the device."""

from __future__ import annotations

from torch import nn

from llavakit.training.strategies.base import STRATEGIES, Strategy


@STRATEGIES.register("single")
class SingleStrategy(Strategy):
    """No distribution; bf16/fp16 autocast (and the fp16 loss scaler) when configured."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to this process's device."""
        return model.to(self.context.device)
