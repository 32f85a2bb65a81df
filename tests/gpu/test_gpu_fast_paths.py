"""The fast paths compute what the plain path computes, on the device in bf16.

- Activation checkpointing (stage ``gradient_checkpointing``) and regional compile (``strategy.compile``): a tiny run
  of 3 optimizer steps (debug preset, bf16 autocast, the real trainer and data pipeline) gives eager's losses.
- Fused loss kernels (``chunked``, ``liger``): the loss and every part's gradients of one bf16 forward/backward equal
  those of the ``logits`` kernel (the ``[N, V]`` logits, then cross-entropy).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from gpu_helpers import (
    debug_config,
    debug_stage,
    model_inputs,
    part_gradients,
    relative_error,
    skip_in_dry_run,
    trainer_batch,
)

from llavakit.distributed import init_distributed
from llavakit.training.config import TRAINABLE_PARTS
from llavakit.training.config_loading import config_from_dict
from llavakit.training.data import build_train_data
from llavakit.training.stages import apply_trainable_parts, model_frozen_names
from llavakit.training.trainer import Trainer

STEPS = 3
# Checkpointing recomputes the same kernels on the same inputs: the losses agree to float noise; 1e-3 allows for
# non-deterministic reductions in a GPU backward, far below the effect of a wrong gradient (O(1e-1) at lr 1e-3).
CHECKPOINTING_TOLERANCE = 1e-3
# Inductor fuses elementwise ops and keeps their intermediates in fp32 where eager rounds each to bf16: per-step
# differences of ~1e-3 that 3 steps of training carry on. 2e-2 relative is bf16's scale, still well below the loss
# change of a step that went wrong.
COMPILE_TOLERANCE = 2e-2
# The fused kernels compute the same bf16 head matmul and fp32 cross-entropy in chunks; they differ from the logits
# path only in summation order: loss to ~1e-3, gradients to bf16 rounding (see test_gpu_precision.py for the scale).
KERNEL_LOSS_TOLERANCE = 5e-3
KERNEL_GRAD_TOLERANCE = 3e-2


def _losses(tmp_path, synth, strategy=None, **stage_fields):
    stage = debug_stage(
        synth,
        trainable=list(TRAINABLE_PARTS),
        max_steps=STEPS,
        global_batch_size=4,
        micro_batch_size=2,
        optim={"lr": 1e-3, "warmup_ratio": 0.0, "schedule": "constant"},
        **stage_fields,
    )
    strategy = {"name": "single", "mixed_precision": "bf16", **(strategy or {})}
    config = config_from_dict(debug_config(tmp_path / "run", [stage], strategy=strategy))
    trainer = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
    trainer.build()
    stream = trainer.micro_batches()
    for _ in range(STEPS):
        trainer.train_step([next(stream) for _ in range(trainer.plan.accumulation_steps)])
    return trainer.state.losses


@pytest.fixture
def eager_losses(tmp_path, synth):
    losses = _losses(tmp_path / "eager", synth)
    assert len(losses) == STEPS and all(map(torch.isfinite, torch.tensor(losses)))
    return losses


def test_gradient_checkpointing_gives_eagers_losses(tmp_path, synth, eager_losses):
    losses = _losses(tmp_path / "checkpointing", synth, gradient_checkpointing=True)
    assert losses == pytest.approx(eager_losses, rel=CHECKPOINTING_TOLERANCE)


def test_regional_compile_gives_eagers_losses(tmp_path, synth, eager_losses):
    torch._dynamo.reset()
    losses = _losses(tmp_path / "compiled", synth, strategy={"compile": True})
    assert losses == pytest.approx(eager_losses, rel=COMPILE_TOLERANCE)


def _kernel_loss_and_grads(fresh_model, synth, device, kernel):
    model = fresh_model("debug-siglip-qwen2")
    apply_trainable_parts(model, TRAINABLE_PARTS, model_frozen_names(model))
    model = model.to(device).train()
    inputs = model_inputs(trainer_batch(model, synth), device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        output = model(**inputs, supervised_logits_only=True, loss_kernel=kernel)
    output.loss.backward()
    return output, part_gradients(model)


@pytest.mark.parametrize("kernel", ["chunked", "liger"])
def test_fused_loss_kernel_matches_logits(kernel, fresh_model, synth, device):
    if kernel == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            pytest.skip("the liger kernel needs the liger-kernel package (pip install liger-kernel)")
        skip_in_dry_run("Liger-Kernel's Triton fused linear cross-entropy")
    reference, reference_grads = _kernel_loss_and_grads(fresh_model, synth, device, "logits")
    output, grads = _kernel_loss_and_grads(fresh_model, synth, device, kernel)
    assert output.logits is None  # the point of a fused kernel: no [N, V] logits
    assert relative_error(output.loss.detach(), reference.loss.detach()) < KERNEL_LOSS_TOLERANCE
    errors = {part: relative_error(grads[part], reference_grads[part]) for part in reference_grads}
    assert grads.keys() == reference_grads.keys() and max(errors.values()) < KERNEL_GRAD_TOLERANCE, errors
