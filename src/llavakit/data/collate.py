"""Batch examples into the model's input dict (docs/architecture.md "data/ → Batch").

Padding side: **right** for training (generation pads on the left, in `llavakit.inference`). Padded positions have
``attention_mask`` 0 and label -100, so the pad id's value never matters, but it must be a real id: the tokenizer
needs a pad token (`build_collator` fails otherwise instead of guessing one).

Images: ``pixel_values`` concatenates the tiles of every image of the batch in placeholder order
(``[N_tiles, 3, S, S]``; tile counts vary per image), with ``image_sizes [N_images, 2]`` (height, width) and
``image_tiled [N_images]``. A batch without images omits the three keys; the model then runs its dummy vision pass
so every trainable parameter still gets a (zero) gradient under DDP/FSDP.

Videos: ``pixel_values_videos [ΣF, 3, S, S]`` concatenates the frames of every video of the batch in placeholder
order (row-major over the batch), with ``video_frames [N_videos]`` (frames per video); omitted without videos.

Bookkeeping keys (pop them before ``model(**batch)``): ``num_tokens`` (real tokens), ``num_padding``,
``num_skipped`` (examples the dataset returned as None under the skip policy), ``sample_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llavakit.data.tokenize import IGNORE_INDEX
from llavakit.errors import ConfigError, DataError

BOOKKEEPING_KEYS = ("num_tokens", "num_padding", "num_skipped", "sample_ids")


@dataclass(frozen=True)
class Collator:
    """Right-padding collator.

    Attributes:
        pad_token_id: id written at padded positions.
    """

    pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [example for example in examples if example is not None]
        if not kept:
            raise DataError(
                f"all {len(examples)} examples of a batch were skipped; see the dataset's skip report"
            )
        width = max(len(example["input_ids"]) for example in kept)
        input_ids = torch.full((len(kept), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(kept), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(kept), width), dtype=torch.long)
        for row, example in enumerate(kept):
            length = len(example["input_ids"])
            input_ids[row, :length] = example["input_ids"]
            labels[row, :length] = example["labels"]
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        batch.update(collate_images(kept))
        batch.update(collate_videos(kept))
        num_tokens = int(attention_mask.sum())
        batch.update(
            num_tokens=num_tokens,
            num_padding=input_ids.numel() - num_tokens,
            num_skipped=len(examples) - len(kept),
            sample_ids=[example["id"] for example in kept],
        )
        return batch


def collate_images(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``pixel_values [N_tiles,3,S,S]``, ``image_sizes [N_images,2]``, ``image_tiled [N_images]``; {} without images."""
    tiles = [example["pixel_values"] for example in examples if example["pixel_values"] is not None]
    if not tiles:
        return {}
    sizes = [size for example in examples for size in example["image_sizes"]]
    tiled = [flag for example in examples for flag in example["image_tiled"]]
    return {
        "pixel_values": torch.cat(tiles),
        "image_sizes": torch.tensor(sizes, dtype=torch.long),
        "image_tiled": torch.tensor(tiled, dtype=torch.bool),
    }


def collate_videos(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``pixel_values_videos [ΣF,3,S,S]``, ``video_frames [N_videos]``; {} without videos (or items without the
    keys: datasets that predate videos)."""
    frames = [example["pixel_values_videos"] for example in examples if example.get("pixel_values_videos") is not None]
    if not frames:
        return {}
    counts = [count for example in examples for count in example.get("video_frames", ())]
    return {"pixel_values_videos": torch.cat(frames), "video_frames": torch.tensor(counts, dtype=torch.long)}


def build_collator(tokenizer: Any) -> Collator:
    """A `Collator` using the tokenizer's pad token; `ConfigError` when it has none."""
    if tokenizer.pad_token_id is None:
        raise ConfigError(
            "the tokenizer has no pad token: set one before training (e.g. tokenizer.pad_token = tokenizer.unk_token, "
            "or add '<pad>'); padded positions are masked, so any existing token works"
        )
    return Collator(int(tokenizer.pad_token_id))
