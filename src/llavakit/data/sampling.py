"""Length-grouped batch samplers: ``group_by_length`` and ``group_by_modality_length``, per rank, resumable.

One epoch's order is a pure function of ``(seed, epoch)`` and is identical on every rank:

1. shuffle the samples (each modality separately for ``by_modality``);
2. cut into windows of ``megabatch_mult`` global batches, sort each window by length (longest first) and cut
   it into *mega-batches* of one global batch (``world_size * batch_size`` samples); ``megabatch_mult=50`` is
   transformers' ``get_length_grouped_indices`` value, ``1`` is upstream LLaVA's (which then only balances ranks
   and barely reduces padding);
3. split every mega-batch into ``world_size`` micro-batches of ``batch_size`` with balanced token sums (greedy:
   the next-longest sample goes to the lightest unfilled rank, upstream ``split_to_even_chunks``);
4. shuffle the mega-batches; rank ``r`` takes micro-batch ``r`` of each.

With ``by_modality``, image and text-only samples (signed ``modality_lengths``: positive = has images) form
separate mega-batches, so every global batch holds one modality, as upstream's ``LengthGroupedSampler``; the
leftovers of both modalities are merged into mixed mega-batches at the end. Incomplete mega-batches are dropped
(upstream scripts train with ``dataloader_drop_last``), so all ranks always run the same number of steps.

Resuming mid-epoch: `GroupedBatchSampler.state_dict` records ``(epoch, batches_done)``; after `load_state_dict`
iteration continues with the next unseen batch. Upstream's sampler is unseeded per epoch and cannot resume.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from llavakit.errors import ConfigError

DEFAULT_MEGABATCH_MULT = 50


def length_sorted_batches(
    indices: list[int], lengths: Sequence[int], size: int, mult: int
) -> tuple[list[list[int]], list[int]]:
    """Full mega-batches of ``size`` cut from length-sorted windows of ``mult * size``, and the leftover indices.

    Lengths are compared by absolute value, so signed ``modality_lengths`` work as they are.
    """
    full = len(indices) // size * size
    batches = []
    for start in range(0, full, size * mult):
        window = sorted(indices[start : min(start + size * mult, full)], key=lambda j: -abs(lengths[j]))
        batches.extend(window[i : i + size] for i in range(0, len(window), size))
    return batches, indices[full:]


def _split_even(megabatch: list[int], lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """``world_size`` equal-count chunks with balanced summed lengths (input sorted longest first)."""
    per_chunk = len(megabatch) // world_size
    chunks: list[list[int]] = [[] for _ in range(world_size)]
    sums = [0] * world_size
    for index in megabatch:
        open_chunks = [c for c in range(world_size) if len(chunks[c]) < per_chunk]
        target = min(open_chunks, key=lambda c: sums[c])
        chunks[target].append(index)
        sums[target] += abs(lengths[index])
    return chunks


def grouped_global_batches(
    lengths: Sequence[int],
    batch_size: int,
    world_size: int,
    seed: int,
    epoch: int,
    by_modality: bool,
    megabatch_mult: int = DEFAULT_MEGABATCH_MULT,
) -> list[list[list[int]]]:
    """The epoch's global batches, each a list of ``world_size`` micro-batches (see the module docstring)."""
    size = batch_size * world_size
    rng = np.random.default_rng([seed, epoch])
    if by_modality:
        groups = [[i for i, n in enumerate(lengths) if n > 0], [i for i, n in enumerate(lengths) if n <= 0]]
    else:
        groups = [list(range(len(lengths)))]
    megabatches, leftovers = [], []
    for group in groups:
        shuffled = [group[i] for i in rng.permutation(len(group))]
        full, rest = length_sorted_batches(shuffled, lengths, size, megabatch_mult)
        megabatches.extend(full)
        leftovers.extend(rest)
    megabatches = [megabatches[i] for i in rng.permutation(len(megabatches))]
    mixed, _ = length_sorted_batches(leftovers, lengths, size, 1)
    return [_split_even(batch, lengths, world_size) for batch in megabatches + mixed]


class GroupedBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of dataset indices (use as a DataLoader ``batch_sampler``).

    Args:
        lengths: token length per sample; signed ``modality_lengths`` when ``by_modality``.
        batch_size: samples per micro-batch on one rank.
        world_size, rank: this process's place.
        seed: base seed; call `set_epoch` before every epoch.
        by_modality: single-modality global batches (``group_by_modality_length``).
        megabatch_mult: global batches per length-sorted window (see the module docstring).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        by_modality: bool = False,
        megabatch_mult: int = DEFAULT_MEGABATCH_MULT,
    ) -> None:
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ConfigError(f"sampler: bad batch_size={batch_size}, world_size={world_size}, rank={rank}")
        if len(lengths) < batch_size * world_size:
            raise ConfigError(
                f"{len(lengths)} samples are fewer than one global batch ({batch_size * world_size})"
            )
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.by_modality = by_modality
        self.megabatch_mult = megabatch_mult
        self.epoch = 0
        self.batches_done = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; restarts at its first batch unless `load_state_dict` follows."""
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def _batches(self) -> list[list[int]]:
        batches = grouped_global_batches(
            self.lengths,
            self.batch_size,
            self.world_size,
            self.seed,
            self.epoch,
            self.by_modality,
            self.megabatch_mult,
        )
        return [batch[self.rank] for batch in batches]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches()[self.batches_done :]:
            self.batches_done += 1
            yield batch
        self.epoch, self.batches_done = self.epoch + 1, 0

    def __len__(self) -> int:
        return len(self._batches()) - self.batches_done

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches_done"}``: where to resume."""
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (from `state_dict`)."""
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
