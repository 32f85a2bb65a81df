"""Shipped training recipes: YAML files under ``llavakit/recipes/``, each a complete `TrainConfig`.

Why: the published hyperparameters (global batch, learning rates per part, epochs, max length, warmup, schedule,
pinpoints, merge type) live in shell scripts and READMEs upstream; here each is one reviewed, tested file whose
header says where every number comes from. A recipe is used as is (``llavakit train --recipe NAME``) or as a base
for overrides (``stages.1.data.path=...``). The demo and users can write their own recipe files in the same format
and pass them with ``--config``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from llavakit.errors import ConfigError
from llavakit.training.config import TrainConfig
from llavakit.training.config_loading import apply_overrides, config_from_dict, read_config_file


def recipes_dir() -> Path:
    """The folder holding the shipped recipe files."""
    return Path(str(resources.files("llavakit") / "recipes"))


def recipe_names() -> list[str]:
    """Names of the shipped recipes (file names without ``.yaml``), sorted."""
    return sorted(path.stem for path in recipes_dir().glob("*.yaml"))


def recipe_dict(name: str) -> dict[str, Any]:
    """The raw mapping of recipe ``name``.

    Raises:
        ConfigError: no such recipe (the message lists the shipped ones).
    """
    path = recipes_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name!r}; shipped recipes: {', '.join(recipe_names())}")
    return yaml.safe_load(path.read_text())


def load_recipe(name: str, overrides: list[str] | None = None) -> TrainConfig:
    """Recipe ``name`` with ``key.sub=value`` overrides applied, validated."""
    data = apply_overrides(recipe_dict(name), overrides or [])
    return config_from_dict(data, source=f"recipe {name}")


def resolve_config(
    config_file: str | None = None, recipe: str | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """The run config of ``llavakit train``: a recipe and/or a YAML file (merged over the recipe), then overrides.

    Raises:
        ConfigError: neither a recipe nor a config file was given, or either is invalid.
    """
    if config_file is None and recipe is None:
        raise ConfigError("give --config FILE.yaml and/or --recipe NAME (or upstream train_mem.py flags)")
    data: dict[str, Any] = recipe_dict(recipe) if recipe else {}
    source = f"recipe {recipe}" if recipe else ""
    if config_file:
        data = merge_config_dicts(data, read_config_file(config_file))
        source = f"{source} + {config_file}" if source else config_file
    return config_from_dict(apply_overrides(data, overrides or []), source=source)


def merge_config_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` merged into ``base``: mappings recursively, lists of mappings item by item, the rest replaced."""
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            merged[key] = merge_config_dicts(old, value)
        elif (
            isinstance(old, list)
            and isinstance(value, list)
            and all(isinstance(v, dict) for v in old + value)
        ):
            merged[key] = (
                [merge_config_dicts(a, b) for a, b in zip(old, value)] + old[len(value) :] + value[len(old) :]
            )
        else:
            merged[key] = value
    return merged
