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
