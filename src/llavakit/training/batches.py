"""Deterministic, resumable per-rank micro-batch order.

Why: a resumed run must see exactly the samples the uninterrupted run would have seen, without re-reading the ones
it already trained on. The order of an epoch is a pure function of ``(seed, epoch, world_size, rank)``, so resuming
is slicing a list of index batches at the saved position, not replaying a DataLoader.

Layout of one epoch (``G`` = global batch, ``m`` = micro-batch, ``W`` = world size)::

    order = permutation(N) (or the modality-grouped order)     cut to a whole number of global batches
    global step k uses order[k*G:(k+1)*G]; rank r takes its elements r, r+W, r+2W, ...  in m-sized micro-batches

so a 1-process run and a W-process run with the same global batch see the same samples at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llavakit.data.sampling import DEFAULT_MEGABATCH_MULT, length_sorted_batches
from llavakit.errors import ConfigError

# order_fn(num_samples, generator) -> a permutation of range(num_samples) as a list
OrderFn = Callable[[int, torch.Generator], list[int]]


def random_order(num_samples: int, generator: torch.Generator) -> list[int]:
    """A uniform random permutation."""
    return torch.randperm(num_samples, generator=generator).tolist()


@dataclass(frozen=True)
class BatchPlan:
    """The micro-batch layout of a stage.

    Attributes:
        num_samples: dataset size.
        global_batch_size: samples per optimizer step over all ranks.
        micro_batch_size: samples per forward pass per rank.
        world_size, rank: this process's place.
        seed: base seed; epoch ``e`` is shuffled with ``seed + e``.
    """

    num_samples: int
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    rank: int
    seed: int

    def __post_init__(self) -> None:
        if self.num_samples < self.global_batch_size:
            raise ConfigError(
                f"the dataset has {self.num_samples} samples, fewer than one global batch "
                f"({self.global_batch_size}); lower global_batch_size or add data"
            )

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the last partial global batch is dropped, as upstream's drop_last)."""
        return self.num_samples // self.global_batch_size

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.global_batch_size // (self.world_size * self.micro_batch_size)

    def epoch_batches(self, epoch: int, order_fn: OrderFn = random_order) -> list[list[int]]:
        """This rank's micro-batches of ``epoch``, in training order."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = order_fn(self.num_samples, generator)[: self.steps_per_epoch * self.global_batch_size]
        mine = order[self.rank :: self.world_size]
        size = self.micro_batch_size
        return [mine[start : start + size] for start in range(0, len(mine), size)]


def modality_grouped_order(lengths: Sequence[int], global_batch_size: int) -> OrderFn:
    """Upstream's ``group_by_modality_length`` ordering: every global batch holds one modality.

    ``lengths`` are signed like upstream's ``modality_lengths`` (positive = has an image, negative = text only).
    Each modality is shuffled, sorted by length inside mega-batches of one global batch, cut into global batches;
    the batches are shuffled together and the two leftover partial batches are merged into a last mixed one
    (upstream ``get_modality_length_grouped_indices`` in ``llava/train/llava_trainer.py``).
    """

    def order(num_samples: int, generator: torch.Generator) -> list[int]:
        if len(lengths) != num_samples:
            raise ConfigError(f"{len(lengths)} modality lengths for {num_samples} samples")
        groups = [[i for i, n in enumerate(lengths) if n > 0], [i for i, n in enumerate(lengths) if n <= 0]]
        full, leftovers = [], []
        for group in groups:
            shuffled = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            batches = [
                shuffled[i : i + global_batch_size] for i in range(0, len(shuffled), global_batch_size)
            ]
            for batch in batches:
                batch.sort(key=lambda index: abs(lengths[index]), reverse=True)
            if batches and len(batches[-1]) < global_batch_size:
                leftovers.extend(batches.pop())
            full.extend(batches)
        full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return [index for batch in full for index in batch] + leftovers

    return order


def length_grouped_order(
    lengths: Sequence[int], global_batch_size: int, megabatch_mult: int = DEFAULT_MEGABATCH_MULT
) -> OrderFn:
    """transformers' ``group_by_length`` ordering: global batches of similar length, in random order.

    The samples are shuffled, cut into windows of ``megabatch_mult`` global batches, each window sorted by length
    (longest first) and cut into global batches, which are then shuffled (``get_length_grouped_indices``, whose
    window is 50 batches). A padded batch costs its longest sample times its size, so this removes most padding
    on one process, where upstream's ``group_by_modality_length`` (a window of one global batch) removes none.
    The partial window's leftover samples come last, as the batch plan drops them.
    """

    def order(num_samples: int, generator: torch.Generator) -> list[int]:
        if len(lengths) != num_samples:
            raise ConfigError(f"{len(lengths)} sample lengths for {num_samples} samples")
        shuffled = torch.randperm(num_samples, generator=generator).tolist()
        batches, leftovers = length_sorted_batches(shuffled, lengths, global_batch_size, megabatch_mult)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return [index for batch in batches for index in batch] + leftovers

    return order
