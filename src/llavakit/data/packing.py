"""Packing: several samples per row up to a token budget, isolated from each other, no padding in between.

Planning (`plan_packs`): samples are shuffled with ``(seed, epoch)`` and packed window by window with best-fit
decreasing on their exact lengths (image tokens included, from the dataset scan), so a row never exceeds the budget
and rows come out nearly full. `PackedDataset` serves one pack per item; a DataLoader with ``batch_size=R`` and
`PackingCollator` then yields ``R`` rows.

Isolation, so a packed batch gives each sample the logits and loss it would get alone:

- ``position_ids`` restart at 0 for every sample (and for the trailing padding);
- ``attn_implementation="sdpa"`` / ``"eager"``: a 4-D block-diagonal causal ``attention_mask [R, 1, T, T]``
  (boolean "may attend" for sdpa, additive 0 / dtype-min floats for eager); transformers passes 4-D masks through
  unchanged (``masking_utils._preprocess_mask_arguments``);
- ``"flash_attention_2"`` / ``"sdpa_varlen"`` (`llavakit.model.attention`): no mask; the attention derives each
  sample's boundaries from the restarting ``position_ids`` and computes ``sum(l_i^2)`` scores, not ``T^2`` (call
  the model with ``use_cache=False``, as training does: transformers reads the boundaries only without a cache);
- the first label of every sample is -100, since the causal shift would otherwise predict it from the previous
  sample's last token (alone, that label is never used either).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from llavakit.data.collate import collate_images, collate_videos
from llavakit.data.tokenize import IGNORE_INDEX
from llavakit.errors import ConfigError, DataError

ATTENTION_MASKS = ("sdpa", "eager", "flash_attention_2", "sdpa_varlen")
# Implementations that read sample boundaries from position_ids and need no mask.
VARLEN_ATTENTION = ("flash_attention_2", "sdpa_varlen")
DEFAULT_WINDOW = 2048


def plan_packs(
    lengths: Sequence[int], budget: int, seed: int, epoch: int, window: int = DEFAULT_WINDOW
) -> list[list[int]]:
    """Group sample indices into packs of total length <= ``budget``, deterministically from (seed, epoch).

    Args:
        lengths: exact token count of each sample (``dataset.lengths``).
        budget: tokens per row.
        seed, epoch: the shuffle; every rank computes the same packs.
        window: samples packed together by best-fit decreasing (larger packs fuller, shuffles less).

    Returns:
        Packs (lists of indices), in training order.
    """
    too_long = [i for i, n in enumerate(lengths) if n > budget]
    if too_long:
        raise ConfigError(
            f"{len(too_long)} samples are longer than the pack budget {budget} (e.g. index {too_long[0]} with "
            f"{lengths[too_long[0]]} tokens): set max_tokens_per_pack >= model_max_length"
        )
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths)).tolist()
    packs = []
    for start in range(0, len(order), window):
        packs.extend(_best_fit_decreasing(order[start : start + window], lengths, budget))
    shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(packs)).tolist()
    return [packs[i] for i in shuffle]


def _best_fit_decreasing(indices: list[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Each sample, longest first, goes to the open pack it fills most tightly."""
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, pack number), kept sorted for bisect
    for index in sorted(indices, key=lambda i: -lengths[i]):
        need = lengths[index]
        slot = bisect.bisect_left(free, (need, -1))
        if slot < len(free):
            room, number = free.pop(slot)
            packs[number].append(index)
            bisect.insort(free, (room - need, number))
        else:
            packs.append([index])
            bisect.insort(free, (budget - need, len(packs) - 1))
    return packs


class PackedDataset(Dataset):
    """One item per pack: the list of the wrapped dataset's examples.

    Args:
        dataset: a dataset with ``lengths`` (e.g. `llavakit.data.dataset.LlavaDataset`).
        budget: tokens per row.
        seed: packing seed; call `set_epoch` before each epoch's DataLoader iterator is created.
    """

    def __init__(self, dataset: Any, budget: int, seed: int = 0, window: int = DEFAULT_WINDOW) -> None:
        self.dataset = dataset
        self.budget = budget
        self.seed = seed
        self.window = window
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Re-plan the packs for ``epoch``."""
        self.packs = plan_packs(self.dataset.lengths, self.budget, self.seed, epoch, self.window)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> list[dict[str, Any] | None]:
        return [self.dataset[i] for i in self.packs[index]]


@dataclass(frozen=True)
class PackingCollator:
    """Collates packs into isolated rows (see the module docstring).

    Attributes:
        pad_token_id: id of the trailing padding of short rows.
        attn_implementation: one of `ATTENTION_MASKS` (decides the mask form).
        mask_dtype: float dtype of the additive ``eager`` mask (the model's compute dtype).
    """

    pad_token_id: int
    attn_implementation: str = "sdpa"
    mask_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.attn_implementation not in ATTENTION_MASKS:
            raise ConfigError(
                f"packing attn_implementation {self.attn_implementation!r} is not one of {ATTENTION_MASKS}"
            )

    def __call__(self, packs: Sequence[Sequence[dict[str, Any] | None]]) -> dict[str, Any]:
        rows = [[example for example in pack if example is not None] for pack in packs]
        num_skipped = sum(len(pack) for pack in packs) - sum(len(row) for row in rows)
        rows = [row for row in rows if row]
        if not rows:
            raise DataError("every example of a packed batch was skipped; see the dataset's skip report")
        width = max(sum(len(example["input_ids"]) for example in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        segment_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            self._fill_row(row, input_ids[r], labels[r], position_ids[r], segment_ids[r])
        num_tokens = int((segment_ids >= 0).sum())
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        batch.update(self._attention(segment_ids))
        batch.update(collate_images([example for row in rows for example in row]))
        batch.update(collate_videos([example for row in rows for example in row]))
        batch.update(
            num_tokens=num_tokens,
            num_padding=input_ids.numel() - num_tokens,
            num_skipped=num_skipped,
            num_samples=sum(len(row) for row in rows),
            sample_ids=[example["id"] for row in rows for example in row],
        )
        return batch

    @staticmethod
    def _fill_row(
        row: list[dict[str, Any]],
        ids: torch.Tensor,
        labels: torch.Tensor,
        positions: torch.Tensor,
        segments: torch.Tensor,
    ) -> None:
        start = 0
        for number, example in enumerate(row):
            length = len(example["input_ids"])
            ids[start : start + length] = example["input_ids"]
            labels[start : start + length] = example["labels"]
            labels[start] = IGNORE_INDEX
            positions[start : start + length] = torch.arange(length)
            segments[start : start + length] = number
            start += length
        # Trailing padding gets its own restarting positions so position-based varlen treats it as a sequence.
        positions[start:] = torch.arange(len(positions) - start)

    def _attention(self, segment_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``attention_mask [R,1,T,T]`` for sdpa/eager; nothing for varlen attention (position_ids suffice)."""
        if self.attn_implementation in VARLEN_ATTENTION:
            return {}
        width = segment_ids.shape[1]
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        # Padding rows attend to themselves only, which keeps every softmax row finite.
        allowed = ((same & (segment_ids[:, :, None] >= 0)) & causal) | torch.eye(width, dtype=torch.bool)
        mask = allowed[:, None]
        if self.attn_implementation == "eager":
            additive = torch.zeros(mask.shape, dtype=self.mask_dtype)
            mask = additive.masked_fill(~mask, torch.finfo(self.mask_dtype).min)
        return {"attention_mask": mask}


@dataclass(frozen=True)
class PaddingFreeCollator:
    """Collates each micro-batch, as the sampler drew it, into one packed row: no padding at all.

    TRL's ``padding_free``. The batch holds the same samples as the padded collate's, so loss and gradients are the
    same up to float rounding; only the work changes. Padded, a batch costs ``B * max(l)`` tokens in every linear
    layer and ``B * max(l)^2`` attention scores; as one row with varlen attention, ``sum(l)`` and ``sum(l^2)`` (the
    demo's batches: 26 % fewer tokens; `benchmarks/train_throughput.py` measures both).

    Attributes:
        packing: the row collator; its ``attn_implementation`` must be one of `VARLEN_ATTENTION`, since with a
            ``[1, 1, T, T]`` mask the row would cost ``T^2`` scores, more than the padded batch.
    """

    packing: PackingCollator

    def __post_init__(self) -> None:
        if self.packing.attn_implementation not in VARLEN_ATTENTION:
            raise ConfigError(
                f"data.padding_free needs varlen attention (model.attn_implementation one of {VARLEN_ATTENTION}), "
                f"got {self.packing.attn_implementation!r}: with a mask the row costs T^2 attention scores"
            )

    def __call__(self, examples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        return self.packing([examples])


def padding_fraction(row_lengths: Sequence[int], width: int | None = None) -> float:
    """Fraction of padding in rows of ``row_lengths`` real tokens padded to ``width`` (default: the longest)."""
    width = width or max(row_lengths)
    return 1.0 - sum(row_lengths) / (width * len(row_lengths))
