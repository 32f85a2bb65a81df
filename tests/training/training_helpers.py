"""Trainer test helpers: debug run and stage dicts on the synthetic dataset (`synth` fixture of the conftest)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def debug_stage(synth, name: str = "finetune", **fields: Any) -> dict[str, Any]:
    """A stage dict on the synthetic data: align stages read captions with ``plain``, others instructions."""
    data_file = synth.align_path if name == "align" else synth.finetune_path
    stage = {
        "name": name,
        "trainable": ["projector"] if name == "align" else ["projector", "language_model"],
        "data": {"path": str(data_file), "image_folder": str(synth.root), "max_length": 512},
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "max_steps": 2,
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
    }
    if name == "align":
        stage["data"]["template"] = "plain"
    return _merge(stage, fields)


def debug_config(run_dir: Path, stages: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    """A run dict with the debug-clip-llama preset, quiet logging and the given stages."""
    config = {
        "run_dir": str(run_dir),
        "model": {"preset": "debug-clip-llama"},
        "stages": stages,
        "logging": {"report_to": "none", "progress_bar": False},
    }
    return _merge(config, sections)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def heldout_questions(synth, folder: Path, count: int) -> Path:
    """A held-out-style JSONL of ``count`` colour/count questions about the first synthetic training images."""
    import json

    images = sorted((synth.root / "images" / "train").glob("*.png"))[:count]
    kinds = [("What colour is the shape?", "red", "colour"), ("How many shapes are there?", "two", "count")]
    records = [
        {"question_id": f"q{i}", "image": str(image), "question": q, "answer": a, "type": t}
        for i, (image, (q, a, t)) in enumerate(zip(images, kinds * count))
    ]
    path = folder / "heldout.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def anyres_batch(model) -> dict[str, Any]:
    """One image (a 1x2 AnyRes grid) between text tokens, every text token supervised."""
    import torch

    generator = torch.Generator().manual_seed(1)
    tile = model.config.image_spec.tile_size
    tiles = torch.randn(3, 3, tile, tile, generator=generator)
    sizes = torch.tensor([[tile, 2 * tile]])
    image_tokens = model.encode_images(tiles, sizes)[0].shape[0]
    text = torch.randint(0, 100, (2, 6), generator=generator)
    ids = torch.cat([text[0], torch.full((image_tokens,), model.config.image_token_id), text[1]])[None]
    labels = torch.where(ids == model.config.image_token_id, -100, ids)
    return {"input_ids": ids, "labels": labels, "pixel_values": tiles, "image_sizes": sizes}


def local_shard(tensor):
    """This rank's shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def adamw_losses(model, batch: dict[str, Any], steps: int) -> list[float]:
    """The losses of ``steps`` AdamW steps (lr 1e-3) on the same batch."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
