"""A non-finite gradient stops training before the optimizer applies it, with an error naming the stage, the step,
the samples and the way out; the weights stay those of the previous step."""

from __future__ import annotations

import pytest
import torch
from training_helpers import debug_config, debug_stage

from llavakit.distributed import init_distributed
from llavakit.errors import TrainingError
from llavakit.training.config_loading import config_from_dict
from llavakit.training.data import build_train_data
from llavakit.training.trainer import Trainer


def test_a_nan_gradient_stops_before_the_update(tmp_path, synth):
    config = config_from_dict(debug_config(tmp_path / "run", [debug_stage(synth, max_steps=3)]))
    trainer = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
    trainer.build()
    stream = trainer.micro_batches()
    accumulation = trainer.plan.accumulation_steps
    trainer.train_step([next(stream) for _ in range(accumulation)])
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    optimizer_state = {name: state["step"].clone() for name, state in _adam_steps(trainer)}
    # A fault in the projector's output (as a corrupt sample or an overflow would cause) poisons every gradient.
    trainer.unwrapped.projector.register_forward_hook(lambda module, args, output: output * float("nan"))
    batches = [next(stream) for _ in range(accumulation)]
    with pytest.raises(TrainingError, match=r"stage 'finetune', step 2: the gradient norm is nan") as raised:
        trainer.train_step(batches)
    ids = [sample for batch in batches for sample in batch["sample_ids"]]
    assert str(ids[0]) in str(raised.value) and "optim.lr" in str(raised.value)
    assert trainer.state.step == 1
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.grad is None
    assert {name: state["step"] for name, state in _adam_steps(trainer)} == optimizer_state


def _adam_steps(trainer):
    names = {id(param): name for name, param in trainer.model.named_parameters()}
    return [(names[id(param)], state) for param, state in trainer.optimizer.state.items()]
