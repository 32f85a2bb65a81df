"""bf16 training forward/backward on the device stays close to fp32, through bf16 autocast and through FSDP2.

The reference is the same model (same preset weights, same batch from the real data pipeline) in fp32 on the same
device with TF32 off. bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per operation), so a forward and
backward through a few layers is expected to land at ~1e-2 relative error; a bug (a wrong cast, a lost scale, a
parameter left out of the compute dtype) shows as O(1) errors.
"""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import model_inputs, part_gradients, relative_error, trainer_batch

from llavakit.training.config import TRAINABLE_PARTS, StrategyConfig
from llavakit.training.stages import apply_trainable_parts, model_frozen_names
from llavakit.training.strategies import build_strategy

PRESETS = ("debug-clip-llama", "debug-siglip-qwen2")
# Measured in the CPU dry run (bf16 on CPU): loss 2e-5..6e-5 (the loss's logits are fp32 under autocast and FSDP2's
# fp32 reduction), gradients 4e-3..7e-3 per part, for both presets and both paths. The bounds leave ~5x margin for
# the GPU's other kernels and summation orders, and stay far below what a bug gives (a wrong cast, a lost loss scale,
# a part computed in the wrong dtype: errors of 0.1 to 1).
LOSS_TOLERANCE = 2e-3
GRAD_TOLERANCE = 3e-2


@pytest.fixture(autouse=True)
def no_tf32():
    # The fp32 reference must be fp32: TF32 matmuls would round it to 10 mantissa bits.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _trainable(model):
    apply_trainable_parts(model, TRAINABLE_PARTS, model_frozen_names(model))
    return model.train()


def _loss_and_grads(model, batch, device, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(**model_inputs(batch, device), supervised_logits_only=True).loss
    loss.backward()
    return loss.detach().float(), part_gradients(model)


def _fp32_reference(fresh_model, preset, synth, device):
    model = _trainable(fresh_model(preset)).to(device)
    batch = trainer_batch(model, synth)
    loss, grads = _loss_and_grads(model, batch, device)
    return batch, loss, grads


def _assert_close_to_reference(loss, grads, reference_loss, reference_grads):
    assert torch.isfinite(loss)
    assert relative_error(loss, reference_loss) < LOSS_TOLERANCE, (float(loss), float(reference_loss))
    assert grads.keys() == reference_grads.keys() == set(TRAINABLE_PARTS)
    errors = {part: relative_error(grads[part], reference_grads[part]) for part in grads}
    assert all(error < GRAD_TOLERANCE for error in errors.values()), errors


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_autocast_matches_fp32(preset, fresh_model, synth, device):
    batch, reference_loss, reference_grads = _fp32_reference(fresh_model, preset, synth, device)
    model = _trainable(fresh_model(preset)).to(device)
    loss, grads = _loss_and_grads(model, batch, device, autocast=True)
    _assert_close_to_reference(loss, grads, reference_loss, reference_grads)


@pytest.mark.parametrize("preset", PRESETS)
def test_fsdp2_bf16_matches_fp32(preset, fresh_model, synth, device, world_of_one):
    batch, reference_loss, reference_grads = _fp32_reference(fresh_model, preset, synth, device)
    strategy = build_strategy(StrategyConfig(name="fsdp2", mixed_precision="bf16"), world_of_one)
    model = strategy.prepare(_trainable(fresh_model(preset)))
    with strategy.autocast():
        loss, grads = _loss_and_grads(model, batch, device)
    # FSDP2 keeps fp32 master weights and reduces gradients in fp32: the gradients it hands the optimizer are fp32.
    assert all(param.grad.dtype == torch.float32 for param in model.parameters() if param.grad is not None)
    _assert_close_to_reference(loss, grads, reference_loss, reference_grads)
