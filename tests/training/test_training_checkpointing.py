"""Activation checkpointing (stage ``gradient_checkpointing``) trains exactly like plain backward, and recomputes.

Non-reentrant checkpointing reruns each LLM decoder layer's and vision layer's forward during backward instead of
keeping its activations. In fp32 on the CPU the rerun does the same arithmetic on the same inputs, so the losses of a
short run agree to float32 rounding (relative 1e-6). That alone would also hold if checkpointing were silently off,
so the test also counts calls of the MLP inside a decoder layer and a vision layer: one per micro-batch without
checkpointing, two with it (the second is the recomputation in backward). A forward pre-hook of the MLP, not a hook
of the layer: recent transformers checkpoints a layer's ``forward`` (outside the layer's own hooks), and torch stops
a recomputation as soon as the saved tensors are rebuilt, before the MLP returns.
"""

from __future__ import annotations

import pytest
from training_helpers import debug_config, debug_stage

from llavakit.distributed import init_distributed
from llavakit.training.config_loading import config_from_dict
from llavakit.training.data import build_train_data
from llavakit.training.trainer import Trainer

STEPS = 2
TOLERANCE = 1e-6


def _run(tmp_path, synth, checkpointing):
    """(losses, forward calls of the MLP of the first decoder layer and vision layer, micro-batches run)."""
    stage = debug_stage(
        synth,
        trainable=["vision_tower", "projector", "language_model"],
        max_steps=STEPS,
        gradient_checkpointing=checkpointing,
        optim={"lr": 1e-3, "warmup_ratio": 0.0, "schedule": "constant"},
    )
    config = config_from_dict(debug_config(tmp_path, [stage]))
    trainer = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
    trainer.build()
    model = trainer.unwrapped
    mlps = {"decoder": model.llm.get_decoder().layers[0].mlp, "vision": model.vision_encoder.layers[0].mlp}
    calls = dict.fromkeys(mlps, 0)
    for name, mlp in mlps.items():
        mlp.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    stream = trainer.micro_batches()
    for _ in range(STEPS):
        trainer.train_step([next(stream) for _ in range(trainer.plan.accumulation_steps)])
    return trainer.state.losses, calls, STEPS * trainer.plan.accumulation_steps


def test_checkpointing_gives_the_same_losses_and_recomputes(tmp_path, synth):
    plain_losses, plain_calls, micro_batches = _run(tmp_path / "plain", synth, checkpointing=False)
    losses, calls, _ = _run(tmp_path / "checkpointing", synth, checkpointing=True)
    assert losses == pytest.approx(plain_losses, rel=TOLERANCE)
    assert plain_calls == {"decoder": micro_batches, "vision": micro_batches}
    assert calls == {"decoder": 2 * micro_batches, "vision": 2 * micro_batches}
