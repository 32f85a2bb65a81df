"""Data-test helpers: tiny images and LLaVA JSON/JSONL files written for a test, and LLaVA samples."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def write_image(path: Path, height: int, width: int, color=(200, 30, 30)) -> Path:
    """Write a solid-colour PNG and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


def write_json(path: Path, samples: list, jsonl: bool = False) -> Path:
    """Write samples as a JSON list (indented, one key per line) or as JSONL."""
    if jsonl:
        path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    else:
        path.write_text(json.dumps(samples, indent=1))
    return path


def chat(*texts: str, image: str | list | None = None, sample_id: str = "s") -> dict:
    """A LLaVA sample whose turns alternate human/gpt."""
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]
    sample = {"id": sample_id, "conversations": turns}
    if image is not None:
        sample["image"] = image
    return sample
