"""Attention stays within each sample of packed and padding-free batches on the device, in bf16.

A model with ``attn_implementation="sdpa_varlen"`` runs a packed batch (several rows of several samples, positions
restarting per sample, trailing padding) and a padding-free batch (one row of a micro-batch's samples) in bf16.
Oracles: each sample run alone in fp32 with plain causal ``sdpa`` (what isolation means), and the same bf16
batch through transformers' ``sdpa`` with the block-diagonal 4-D mask (what the varlen kernel replaces). Gradients
of the token-mean loss too: alone, each sample's summed loss is divided by the pack's supervised-token count, so
the accumulated gradients are the pack's.

On CUDA in bf16 the varlen path must run PyTorch's ``varlen_attn`` (`llavakit.model.attention.varlen_kernel_name`),
the point of the path; elsewhere it falls back to one SDPA call per sample.
"""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import finetune_stage, part_gradients, relative_error, skip_in_dry_run, trainer_batch

from llavakit.data.collate import Collator
from llavakit.data.packing import PackingCollator, PaddingFreeCollator
from llavakit.model import attention
from llavakit.model.llava_next import cast_parameters
from llavakit.training.config import TRAINABLE_PARTS
from llavakit.training.data import build_train_data
from llavakit.training.stages import apply_trainable_parts, model_frozen_names

PRESETS = ("debug-clip-llama", "debug-siglip-qwen2")
# Rows of dataset indices per layout: packed = two rows (3 and 2 samples, the shorter row padded at its end);
# padding_free = one row of a 4-sample micro-batch.
LAYOUTS = {"packed": [[0, 1, 2], [3, 4]], "padding_free": [[5, 6, 7, 8]]}
# bf16 vs the fp32 reference, relative norm error per sample's logits and per part's gradients. bf16 rounds to
# 2^-9 per operation; through two decoder layers and the vision tower ~5e-3 is typical (see
# test_gpu_precision.py), so 3e-2 has margin. A sample that sees another sample's tokens, or a shifted boundary,
# changes its logits by O(1) relative (the debug models' logits depend strongly on context).
TOLERANCE = 3e-2
INPUTS = (
    "input_ids",
    "position_ids",
    "attention_mask",
    "pixel_values",
    "image_sizes",
    "image_tiled",
    "labels",
)


def _examples(model, synth, rows):
    data = build_train_data(finetune_stage(synth), model)
    return [[data.dataset[index] for index in row] for row in rows]


def _batch(examples, layout, attn, pad_token_id):
    rows = PackingCollator(pad_token_id, attn_implementation=attn)
    if layout == "padding_free" and attn == "sdpa_varlen":
        return PaddingFreeCollator(rows)(examples[0])
    return rows(examples)


def _run(model, batch, device, num_items):
    """Logits ``[B, T, V]`` of the batch and (loss / num_items)'s gradients accumulated into the model."""
    inputs = {key: batch[key].to(device) for key in INPUTS if batch.get(key) is not None}
    labels = inputs.pop("labels")
    output = model(**inputs, use_cache=False)
    loss = model(**inputs, labels=labels, supervised_logits_only=True, num_items_in_batch=num_items).loss
    loss.backward()
    return output.logits.detach().float()


def _trainable(model, device, dtype):
    apply_trainable_parts(model, TRAINABLE_PARTS, model_frozen_names(model))
    return cast_parameters(model.to(device), dtype).train()


def _supervised(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


@pytest.fixture
def kernels(monkeypatch):
    """The kernel names `varlen_attention_forward` chose, call by call."""
    chosen = []
    original = attention.varlen_kernel_name

    def spy(*args, **kwargs):
        chosen.append(original(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(attention, "varlen_kernel_name", spy)
    return chosen


def _expected_kernel(device):
    return "varlen_attn" if device.type == "cuda" else "sdpa_per_sample"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("preset", PRESETS)
def test_varlen_bf16_isolates_samples(preset, layout, fresh_model, synth, device, kernels):
    varlen = _trainable(fresh_model(preset, attn_implementation="sdpa_varlen"), device, torch.bfloat16)
    masked = _trainable(fresh_model(preset, attn_implementation="sdpa"), device, torch.bfloat16)
    alone = _trainable(fresh_model(preset, attn_implementation="sdpa"), device, torch.float32)
    pad = varlen.tokenizer.pad_token_id
    examples = _examples(alone, synth, LAYOUTS[layout])
    varlen_batch = _batch(examples, layout, "sdpa_varlen", pad)
    masked_batch = _batch(examples, layout, "sdpa", pad)
    assert "attention_mask" not in varlen_batch and masked_batch["attention_mask"].dim() == 4
    items = _supervised(varlen_batch)

    varlen_logits = _run(varlen, varlen_batch, device, items)
    assert kernels and set(kernels) == {_expected_kernel(device)}, kernels
    masked_logits = _run(masked, masked_batch, device, items)
    collate = Collator(pad)
    for r, row in enumerate(examples):
        start = 0
        for example in row:
            single = {**collate([example]), "labels": example["labels"].clone()[None]}
            single["labels"][0, 0] = -100  # as packing does: alone, the first label is never a target either
            reference = _run(alone, single, device, items)[0]
            end = start + reference.shape[0]
            assert relative_error(varlen_logits[r, start:end], reference) < TOLERANCE, (r, start)
            assert relative_error(masked_logits[r, start:end], reference) < TOLERANCE, (r, start)
            assert relative_error(varlen_logits[r, start:end], masked_logits[r, start:end]) < TOLERANCE
            start = end

    reference_grads = part_gradients(alone)
    for model in (varlen, masked):
        grads = part_gradients(model)
        errors = {part: relative_error(grads[part], reference_grads[part]) for part in reference_grads}
        assert grads.keys() == reference_grads.keys() and max(errors.values()) < TOLERANCE, errors


def test_varlen_kernel_runs_under_bf16_autocast(fresh_model, synth, device, kernels):
    # The single-process and DDP strategies train in fp32 parameters under bf16 autocast: the varlen kernel must
    # run there too, not only with FSDP2's bf16 parameters.
    model = _trainable(
        fresh_model("debug-clip-llama", attn_implementation="sdpa_varlen"), device, torch.float32
    )
    batch = trainer_batch(model, synth, data={"padding_free": True})
    assert batch["position_ids"].shape[0] == 1
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        loss = model(**{key: batch[key].to(device) for key in INPUTS if batch.get(key) is not None}).loss
    loss.backward()
    assert torch.isfinite(loss) and kernels
    skip_in_dry_run("torch's varlen_attn kernel")
    assert set(kernels) == {"varlen_attn"}, kernels
