"""A tiny tensor-level dataset for trainer tests (independent of the data pipeline).

Each sample is random text token ids, optionally with one image whose ``<image>`` placeholder is expanded with
`count_visual_tokens` and whose tiles come from `process_image`, exactly as the data pipeline's contract says.
Samples are generated once from a seed, so every process and every run sees the same data.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from PIL import Image

from llavakit.anyres.geometry import count_visual_tokens
from llavakit.anyres.pixels import process_image
from llavakit.model.llava_next import LlavaNextModel
from llavakit.training.config import StageConfig
from llavakit.training.trainer import IGNORE_INDEX, TrainData


def make_samples(model: LlavaNextModel, count: int = 32, seed: int = 0, image_fraction: float = 0.5) -> list[dict]:
    """Samples with keys ``input_ids``, ``labels`` and (image samples) ``pixel_values``, ``image_size``."""
    rng = random.Random(seed)
    spec = model.config.image_spec
    vocab = model.llm.get_input_embeddings().weight.shape[0]
    special = {model.config.image_token_id, model.config.pad_token_id}
    words = [token for token in range(5, vocab) if token not in special]
    samples = []
    for _ in range(count):
        prompt = [rng.choice(words) for _ in range(rng.randint(2, 6))]
        answer = [rng.choice(words) for _ in range(rng.randint(2, 10))]
        sample: dict[str, Any] = {}
        if rng.random() < image_fraction:
            size = (rng.randint(20, 96), rng.randint(20, 96))
            colour = tuple(rng.randint(0, 255) for _ in range(3))
            sample["pixel_values"] = process_image(Image.new("RGB", size[::-1], colour), spec)
            sample["image_size"] = size
            prompt = [model.config.image_token_id] * count_visual_tokens(size, spec) + prompt
        sample["input_ids"] = prompt + answer
        sample["labels"] = [IGNORE_INDEX] * len(prompt) + answer
        samples.append(sample)
    return samples


def collate(samples: list[dict], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest sample; concatenate tiles of all images in order."""
    length = max(len(s["input_ids"]) for s in samples)
    batch = {
        "input_ids": torch.tensor([s["input_ids"] + [pad_id] * (length - len(s["input_ids"])) for s in samples]),
        "labels": torch.tensor([s["labels"] + [IGNORE_INDEX] * (length - len(s["labels"])) for s in samples]),
        "attention_mask": torch.tensor([[1] * len(s["input_ids"]) + [0] * (length - len(s["input_ids"])) for s in samples]),
    }
    images = [s for s in samples if "pixel_values" in s]
    if images:
        batch["pixel_values"] = torch.cat([s["pixel_values"] for s in images])
        batch["image_sizes"] = torch.tensor([s["image_size"] for s in images])
    return batch


def fake_data_factory(count: int = 32, seed: int = 0):
    """A `DataFactory` producing `make_samples` data for any stage."""

    def factory(stage: StageConfig, model: LlavaNextModel) -> TrainData:
        samples = make_samples(model, count=count, seed=seed)
        lengths = [len(s["input_ids"]) * (1 if "pixel_values" in s else -1) for s in samples]
        return TrainData(samples, lambda batch: collate(batch, model.config.pad_token_id), lengths)

    return factory
