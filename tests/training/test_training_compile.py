"""Regional compile (``strategy.compile``) trains like eager: the same losses over a tiny CPU run.

``torch.compile`` of each shard unit (decoder and vision layers) through inductor on the CPU, fp32. Inductor fuses
elementwise ops and may reorder reductions, so the losses agree to float32 rounding carried through a few steps of
training, not bitwise: relative 1e-4, while a unit compiled wrong (a dropped residual, a stale graph reused for
another shape) moves the loss by far more. The bf16 counterpart on a GPU is tests/gpu/test_gpu_fast_paths.py.

Marked slow: inductor's CPU compile of the units (and one recompile for the second step's sequence length) takes
~90 s on 2 cores, the rest of the test under 2 s.
"""

from __future__ import annotations

import pytest
import torch
from training_helpers import debug_config, debug_stage

from llavakit.distributed import init_distributed
from llavakit.training.config_loading import config_from_dict
from llavakit.training.data import build_train_data
from llavakit.training.trainer import Trainer

STEPS = 2
TOLERANCE = 1e-4


def _trainer(tmp_path, synth, compile_units):
    stage = debug_stage(
        synth,
        trainable=["vision_tower", "projector", "language_model"],
        max_steps=STEPS,
        global_batch_size=2,
        micro_batch_size=2,
        optim={"lr": 1e-3, "warmup_ratio": 0.0, "schedule": "constant"},
    )
    config = debug_config(tmp_path, [stage], strategy={"name": "single", "compile": compile_units})
    trainer = Trainer(
        config_from_dict(config), 0, init_distributed(needs_process_group=False), build_train_data
    )
    trainer.build()
    return trainer


def _train(trainer):
    stream = trainer.micro_batches()
    for _ in range(STEPS):
        trainer.train_step([next(stream) for _ in range(trainer.plan.accumulation_steps)])
    return trainer.state.losses


@pytest.mark.slow
def test_compiled_units_train_like_eager(tmp_path, synth):
    torch._dynamo.reset()
    compiled = _trainer(tmp_path / "compiled", synth, compile_units=True)
    units = compiled.unwrapped.shard_units()
    # nn.Module.compile keeps the module and compiles its forward in place: every unit must have been compiled.
    assert units and all(getattr(unit, "_compiled_call_impl", None) is not None for unit in units)
    eager = _trainer(tmp_path / "eager", synth, compile_units=False)
    assert all(getattr(unit, "_compiled_call_impl", None) is None for unit in eager.unwrapped.shard_units())
    assert _train(compiled) == pytest.approx(_train(eager), rel=TOLERANCE)
