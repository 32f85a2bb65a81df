"""Distribution strategies, chosen by id (``single``, ``ddp``, ``fsdp2``); each wraps the model from outside."""

from llavakit.training.strategies.base import STRATEGIES, Strategy, build_strategy
from llavakit.training.strategies.ddp import DDPStrategy
from llavakit.training.strategies.fsdp import FSDP2Strategy
from llavakit.training.strategies.single import SingleStrategy

__all__ = ["STRATEGIES", "DDPStrategy", "FSDP2Strategy", "SingleStrategy", "Strategy", "build_strategy"]
