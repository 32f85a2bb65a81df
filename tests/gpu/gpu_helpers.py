"""Helpers of the GPU test tier (tests/gpu), imported by its tests as ``gpu_helpers``.

A module of its own, not the conftest: ``from conftest import ...`` names whichever conftest pytest loaded last,
which is another folder's when several test folders are collected together.

Data comes from the real pipeline: the synthetic LLaVA dataset and run-dict helpers of
``tests/training`` (loaded from its files, not copied), scanned with the model's tokenizer and image
spec and collated as the trainer does (`trainer_batch`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch

DRY_RUN = os.environ.get("LLAVAKIT_GPU_TESTS_ON_CPU") == "1"
SKIP_REASON = "needs a CUDA device (run `pytest -m gpu` on a GPU machine)"
HERE = Path(__file__).parent


def _training_helpers() -> Any:
    path = HERE.parent / "training" / "training_helpers.py"
    spec = importlib.util.spec_from_file_location("llavakit_training_test_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


training_helpers = _training_helpers()
debug_config = training_helpers.debug_config
debug_stage = training_helpers.debug_stage


def skip_in_dry_run(what: str) -> None:
    """Skip the calling test in the CPU dry run: ``what`` needs CUDA."""
    if DRY_RUN and not torch.cuda.is_available():
        pytest.skip(f"{what} needs CUDA; the CPU dry run (LLAVAKIT_GPU_TESTS_ON_CPU=1) cannot run it")


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖value − reference‖ / ‖reference‖`` in float64."""
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm())


def part_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each trainable part's gradients (`llavakit.training.stages.part_of`), flattened and concatenated in float32.

    FSDP2's DTensor gradients are gathered first (a world of one holds the whole tensor anyway).
    """
    from llavakit.training.stages import part_of

    parts: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        parts.setdefault(part_of(name), []).append(grad.detach().float().flatten().cpu())
    return {part: torch.cat(grads) for part, grads in parts.items()}


def finetune_stage(synth: Any, **fields: Any) -> Any:
    """The `StageConfig` of a finetune stage on the synthetic data (all three parts trainable by default)."""
    from llavakit.training.config_loading import config_from_dict

    fields = {"trainable": ["vision_tower", "projector", "language_model"], **fields}
    # The model section only has to admit data.padding_free; the stage is used with whatever model the caller has.
    model = {"preset": "debug-clip-llama", "attn_implementation": "sdpa_varlen"}
    return config_from_dict(debug_config(Path("unused"), [debug_stage(synth, **fields)], model=model)).stages[
        0
    ]


def trainer_batch(model: Any, synth: Any, indices: range = range(4), **stage_fields: Any) -> dict[str, Any]:
    """A micro-batch of the synthetic finetune data as the trainer collates it (padded), CPU tensors."""
    from llavakit.training.data import build_train_data

    data = build_train_data(finetune_stage(synth, **stage_fields), model)
    return data.collate([data.dataset[index] for index in indices])


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's model inputs (`llavakit.training.trainer.MODEL_INPUTS` and labels) on ``device``."""
    from llavakit.training.trainer import MODEL_INPUTS

    keys = (*MODEL_INPUTS, "labels")
    return {key: batch[key].to(device) for key in keys if batch.get(key) is not None}
