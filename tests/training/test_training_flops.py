"""The FLOP convention of `llavakit.training.flops` against PyTorch's own FLOP counter on a real forward + backward,
against a hand computation, and the sample boundaries it reads from padded, packed and padding-free batches."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llavakit.anyres.geometry import count_visual_tokens, grid_shape
from llavakit.data.collate import Collator
from llavakit.data.packing import PackingCollator, PaddingFreeCollator
from llavakit.errors import ConfigError
from llavakit.model.presets import build_preset_in_memory
from llavakit.training.flops import FlopCounter, PartCost, sample_lengths
from llavakit.training.stages import apply_trainable_parts, model_frozen_names

ATTENTION_OPS = {"bmm"}  # eager attention's QKᵀ and AV, forward and backward
WEIGHT_OPS = {"mm", "addmm", "convolution", "convolution_backward"}


def test_part_cost_matches_a_hand_computation():
    llm = PartCost(params=1000, layers=2, width=8, causal=True, weight_factor=6, attention_factor=3)
    assert llm.sequence_flops(10) == 6 * 1000 * 10 + 3 * 2 * 2 * 8 * 10 * 10
    vision = PartCost(params=500, layers=3, width=4, causal=False, weight_factor=2, attention_factor=1)
    assert vision.sequence_flops(7) == 2 * 500 * 7 + 1 * 4 * 3 * 4 * 7 * 7


@pytest.mark.parametrize(
    ("trainable", "factors"),
    [
        (("vision_tower", "projector", "language_model"), (6, 6, 6, 3, 3)),
        (("projector",), (2, 6, 4, 1, 3)),  # align: LLM frozen, gradients flow through it to the projector
        (("language_model",), (2, 2, 6, 1, 3)),
    ],
)
def test_factors_follow_which_parts_train(trainable, factors):
    with torch.device("meta"):
        model = build_preset_in_memory("debug-clip-llama")
    counter = FlopCounter.from_model(model, trainable)
    got = (
        counter.vision.weight_factor,
        counter.projector.weight_factor,
        counter.llm.weight_factor,
        counter.vision.attention_factor,
        counter.llm.attention_factor,
    )
    assert got == factors
    with pytest.raises(ConfigError, match="vision"):
        FlopCounter.from_model(model, ["vision"])


@pytest.mark.parametrize(
    "trainable", [("vision_tower", "projector", "language_model"), ("projector",)], ids=["finetune", "align"]
)
def test_step_flops_match_torch_flop_counter(trainable):
    """PyTorch counts every matmul that runs; eager attention computes the full causal square (twice our half)."""
    torch.manual_seed(0)
    model = build_preset_in_memory("debug-clip-llama", attn_implementation="eager").train()
    apply_trainable_parts(model, trainable, model_frozen_names(model))
    spec = model.config.image_spec
    size = (48, 70)
    rows, cols = grid_shape(size, spec)
    tiles = 1 + rows * cols
    visual = count_visual_tokens(size, spec)
    image = model.config.image_token_id
    input_ids = torch.tensor([[5, 6, 7, *[image] * visual, *range(10, 210)]])
    labels = input_ids.clone()
    labels[:, : 3 + visual] = -100
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randn(tiles, 3, spec.tile_size, spec.tile_size),
        "image_sizes": torch.tensor([size]),
    }
    with FlopCounterMode(display=False) as mode:
        model(**batch).loss.backward()
    by_op = {str(op).split(".")[-1]: int(n) for op, n in mode.get_flop_counts()["Global"].items()}
    assert set(by_op) <= ATTENTION_OPS | WEIGHT_OPS, by_op

    counter = FlopCounter.from_model(model, trainable)
    length = input_ids.shape[1]
    llm, vision = counter.llm, counter.vision
    llm_attention = llm.sequence_flops(length) - llm.weight_factor * llm.params * length
    vision_attention = vision.sequence_flops(counter.vision_tokens) - (
        vision.weight_factor * vision.params * counter.vision_tokens
    )
    # Some transformers releases also compute RoPE's angles as a (tiny) batched matmul: 0.004 % here.
    assert 2 * llm_attention + tiles * vision_attention == pytest.approx(by_op["bmm"], rel=1e-4)
    weights = counter.batch_flops(batch) - llm_attention - tiles * vision_attention
    measured = sum(by_op.get(op, 0) for op in WEIGHT_OPS)
    # Biases and norm weights are counted as parameters but run no matmul; they are ~1 % of this tiny model.
    assert weights == pytest.approx(measured, rel=0.03)


def _example(identifier: str, length: int) -> dict:
    ids = torch.arange(1, length + 1)
    return {
        "id": identifier,
        "input_ids": ids,
        "labels": ids.clone(),
        "pixel_values": None,
        "image_sizes": [],
        "image_tiled": [],
    }


def test_sample_lengths_of_padded_packed_and_padding_free_batches():
    pad = 0
    examples = [_example("a", 5), _example("b", 3), _example("c", 4)]
    assert sample_lengths(Collator(pad)(examples), pad) == [5, 3, 4]
    rows = PackingCollator(pad, attn_implementation="sdpa_varlen")
    assert sample_lengths(PaddingFreeCollator(rows)(examples), pad) == [5, 3, 4]
    # Two packed rows: [a b] (8 tokens) and [c] + 4 tokens of padding, whose positions restart too.
    packed = rows([[examples[0], examples[1]], [examples[2]]])
    assert packed["num_padding"] == 4
    assert sample_lengths(packed, pad) == [5, 3, 4]
    masked = PackingCollator(pad, attn_implementation="sdpa")([[examples[0], examples[1]], [examples[2]]])
    assert sample_lengths(masked, pad) == [5, 3, 4]
