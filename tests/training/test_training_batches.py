"""Batch orders: the length-grouped order cuts padding and keeps every sample; the trainer uses it when asked."""

from __future__ import annotations

import pytest
import torch
from training_helpers import debug_config, debug_stage

from llavakit.data import packing
from llavakit.distributed import init_distributed
from llavakit.errors import ConfigError
from llavakit.training import config as training_config
from llavakit.training.batches import length_grouped_order, modality_grouped_order, random_order
from llavakit.training.config_loading import config_from_dict
from llavakit.training.data import build_train_data
from llavakit.training.trainer import Trainer


def _padding_fraction(order: list[int], lengths: list[int], batch: int) -> float:
    """Share of a right-padded batch that is padding, over the full batches of ``order``."""
    padded = used = 0
    for start in range(0, len(order) // batch * batch, batch):
        sizes = [abs(lengths[i]) for i in order[start : start + batch]]
        padded += max(sizes) * batch
        used += sum(sizes)
    return 1 - used / padded


def _lengths(n: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(20, 400, (n,), generator=generator).tolist()


def test_length_grouped_order_is_a_permutation_with_little_padding():
    lengths = _lengths(1000)
    order = length_grouped_order(lengths, global_batch_size=16)(1000, torch.Generator().manual_seed(3))
    assert sorted(order) == list(range(1000))
    grouped = _padding_fraction(order, lengths, 16)
    shuffled = _padding_fraction(random_order(1000, torch.Generator().manual_seed(3)), lengths, 16)
    # Uniform lengths in [20, 400): a random batch of 16 is ~45 % padding; windows of 50 batches leave ~1 %.
    assert shuffled > 0.3 and grouped < 0.05


def test_modality_grouped_order_removes_no_padding_on_one_process():
    # Upstream's window is one global batch: it sorts inside a batch, which changes no batch's padding.
    lengths = _lengths(1000)
    order = modality_grouped_order(lengths, global_batch_size=16)(1000, torch.Generator().manual_seed(3))
    assert sorted(order) == list(range(1000)) and _padding_fraction(order, lengths, 16) > 0.3


def test_length_grouped_order_is_seeded_and_batches_come_in_random_order():
    lengths = _lengths(800)
    order = length_grouped_order(lengths, global_batch_size=16)
    first = order(800, torch.Generator().manual_seed(1))
    assert first == order(800, torch.Generator().manual_seed(1))
    assert first != order(800, torch.Generator().manual_seed(2))
    longest = [max(lengths[i] for i in first[s : s + 16]) for s in range(0, 800, 16)]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)


def test_length_grouped_order_checks_the_sample_count():
    with pytest.raises(ConfigError, match="10 sample lengths for 12 samples"):
        length_grouped_order([5] * 10, global_batch_size=4)(12, torch.Generator())


def _padding_in_first_steps(tmp_path, synth, name: str, **data) -> float:
    stage = debug_stage(synth, global_batch_size=8, micro_batch_size=8, data=data)
    config = config_from_dict(debug_config(tmp_path / name, [stage]))
    trainer = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
    trainer.build()
    stream = trainer.micro_batches()
    batches = [next(stream) for _ in range(trainer.plan.steps_per_epoch)]
    padding = sum(int((batch["attention_mask"] == 0).sum()) for batch in batches)
    return padding / sum(batch["attention_mask"].numel() for batch in batches)


def test_trainer_batches_grouped_by_length_hold_less_padding(tmp_path, synth):
    grouped = _padding_in_first_steps(tmp_path, synth, "grouped", group_by_length=True)
    shuffled = _padding_in_first_steps(tmp_path, synth, "shuffled")
    assert grouped < shuffled / 2


def test_length_grouping_conflicts_are_config_errors(tmp_path, synth):
    both = debug_stage(synth, data={"group_by_length": True, "group_by_modality_length": True})
    with pytest.raises(ConfigError, match="choose one of data.group_by_length and data.group_by_modality_length"):
        config_from_dict(debug_config(tmp_path / "both", [both]))
    packed = debug_stage(synth, data={"group_by_length": True, "packing": True})
    with pytest.raises(ConfigError, match="data.packing excludes data.group_by_length"):
        config_from_dict(debug_config(tmp_path / "packed", [packed]))
    free = debug_stage(synth, data={"packing": True, "padding_free": True})
    with pytest.raises(ConfigError, match="choose one of data.packing and data.padding_free"):
        config_from_dict(debug_config(tmp_path / "free", [free]))


def _first_steps(tmp_path, synth, name: str, attention: str, **data) -> tuple[list, list[list[str]], Trainer]:
    """The first 3 steps' metrics and sample ids, and the trainer that took them."""
    stage = debug_stage(synth, global_batch_size=8, micro_batch_size=4, max_steps=3, data=data)
    config = config_from_dict(debug_config(tmp_path / name, [stage], model={"attn_implementation": attention}))
    trainer = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
    trainer.build()
    stream = trainer.micro_batches()
    metrics, ids = [], []
    for _ in range(3):
        batches = [next(stream), next(stream)]
        ids.append([sample for batch in batches for sample in batch["sample_ids"]])
        metrics.append(trainer.train_step(batches))
    return metrics, ids, trainer


def test_padding_free_trains_the_padded_batches_with_no_padding(tmp_path, synth):
    padded, padded_ids, _ = _first_steps(tmp_path, synth, "padded", "sdpa")
    free, free_ids, _ = _first_steps(tmp_path, synth, "free", "sdpa_varlen", padding_free=True)
    assert free_ids == padded_ids
    assert all(m.num_padding == 0 for m in free) and all(m.num_padding > 0 for m in padded)
    assert [m.num_tokens for m in free] == [m.num_tokens for m in padded]
    for ours, reference in zip(free, padded, strict=True):
        assert ours.loss == pytest.approx(reference.loss, rel=1e-4)
        assert ours.grad_norm == pytest.approx(reference.grad_norm, rel=1e-3)


def test_padding_free_with_masked_attention_fails_before_any_weight_loads(tmp_path, synth):
    free = debug_stage(synth, data={"padding_free": True})
    with pytest.raises(ConfigError, match=r"stages \['finetune'\] set data.padding_free.*got 'sdpa'"):
        config_from_dict(debug_config(tmp_path / "sdpa", [free]))
    assert training_config.VARLEN_ATTENTION == packing.VARLEN_ATTENTION


def test_cached_samples_train_the_same_steps_from_memory(tmp_path, synth):
    plain, plain_ids, _ = _first_steps(tmp_path, synth, "plain", "sdpa")
    cached, cached_ids, trainer = _first_steps(tmp_path, synth, "cached", "sdpa", cache_samples=True)
    assert cached_ids == plain_ids
    assert [m.loss for m in cached] == pytest.approx([m.loss for m in plain], rel=1e-6)
    dataset = trainer.data.dataset
    assert dataset[0] is dataset[0]  # served from memory
