"""Grouped samplers: single-modality global batches, balanced ranks, determinism and mid-epoch resume."""

from __future__ import annotations

import numpy as np
import pytest

from llavakit.data.sampling import GroupedBatchSampler, grouped_global_batches
from llavakit.errors import ConfigError


def signed_lengths(n=203, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 2000, n)
    return [int(x) if rng.random() < 0.7 else -int(x) for x in lengths]


def test_modality_batches_are_single_modality_except_the_mixed_tail():
    lengths = signed_lengths()
    batches = grouped_global_batches(lengths, batch_size=4, world_size=2, seed=1, epoch=0, by_modality=True)
    signs = [{lengths[i] > 0 for chunk in batch for i in chunk} for batch in batches]
    num_image = sum(n > 0 for n in lengths)
    pure = num_image // 8 + (len(lengths) - num_image) // 8
    assert all(len(s) == 1 for s in signs[:pure])
    assert all(len(chunk) == 4 for batch in batches for chunk in batch)
    used = [i for batch in batches for chunk in batch for i in chunk]
    assert len(used) == len(set(used)) and len(used) >= pure * 8


def test_ranks_get_balanced_token_sums():
    lengths = [abs(n) for n in signed_lengths()]
    batches = grouped_global_batches(lengths, batch_size=8, world_size=4, seed=0, epoch=0, by_modality=False)
    for batch in batches:
        sums = [sum(lengths[i] for i in chunk) for chunk in batch]
        longest = max(lengths[i] for chunk in batch for i in chunk)
        assert max(sums) - min(sums) <= longest


def test_length_grouping_reduces_padding():
    lengths = [abs(n) for n in signed_lengths(800)]

    def padding(batches):
        return sum(
            len(chunk) * max(lengths[i] for i in chunk) - sum(lengths[i] for i in chunk)
            for batch in batches
            for chunk in batch
        )

    grouped = grouped_global_batches(lengths, 4, 1, seed=0, epoch=0, by_modality=False)
    rng = np.random.default_rng(0).permutation(len(lengths)).tolist()
    plain = [[rng[i : i + 4]] for i in range(0, 800, 4)]
    assert padding(grouped) < 0.5 * padding(plain)


def test_deterministic_per_epoch_and_identical_across_ranks():
    lengths = signed_lengths()
    a = grouped_global_batches(lengths, 4, 2, seed=5, epoch=3, by_modality=True)
    assert a == grouped_global_batches(lengths, 4, 2, seed=5, epoch=3, by_modality=True)
    assert a != grouped_global_batches(lengths, 4, 2, seed=5, epoch=4, by_modality=True)
    ranks = [list(GroupedBatchSampler(lengths, 4, 2, rank, seed=5, by_modality=True)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))


def test_resume_mid_epoch_continues_with_the_next_batch():
    lengths = signed_lengths()
    full = GroupedBatchSampler(lengths, 4, seed=2, by_modality=True)
    full.set_epoch(1)
    expected = list(full)
    interrupted = GroupedBatchSampler(lengths, 4, seed=2, by_modality=True)
    interrupted.set_epoch(1)
    iterator = iter(interrupted)
    seen = [next(iterator) for _ in range(5)]
    state = interrupted.state_dict()
    resumed = GroupedBatchSampler(lengths, 4, seed=2, by_modality=True)
    resumed.load_state_dict(state)
    assert seen + list(resumed) == expected
    assert state == {"epoch": 1, "batches_done": 5}


def test_too_few_samples_is_an_error():
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        GroupedBatchSampler([5, 6, 7], batch_size=4)
