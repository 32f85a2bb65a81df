"""Reading run configs: YAML files, ``key.sub=value`` overrides, and the typed build of a `TrainConfig`.

Why a separate module: `llavakit.training.config` declares *what* a run is; this module turns untyped input (YAML,
command-line strings, recipe files) into those dataclasses, naming the dotted path of every unknown key or
mistyped value, so a typo fails before anything is loaded.

Overrides use dotted paths into the tree: ``stages.0.optim.lr=1e-4``, ``strategy.name=fsdp2``; ``stages.*.x=v`` sets
the field in every stage. Values are parsed as YAML scalars (``true``, ``1e-4``, ``[a, b]``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from llavakit.errors import ConfigError
from llavakit.training.config import TrainConfig, plain_data


def config_from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a validated `TrainConfig` from a plain dict; unknown keys are an error naming their dotted path."""
    return _build(TrainConfig, data, source)


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config file and apply ``key.sub=value`` overrides.

    Raises:
        ConfigError: the file is missing or not a mapping, a key is unknown, or a value has the wrong type.
    """
    return config_from_dict(apply_overrides(read_config_file(path), overrides or []), source=str(path))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML config file; `ConfigError` when missing, invalid or not a mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML config file (or --recipe NAME)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` override set (``*`` indexes every list item)."""
    data = plain_data(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form key.sub=value")
        _set_path(data, key.split("."), yaml.safe_load(raw) if raw else "", override)
    return data


def _set_path(node: Any, keys: list[str], value: Any, override: str) -> None:
    head, rest = keys[0], keys[1:]
    if isinstance(node, list):
        targets = range(len(node)) if head == "*" else [_list_index(head, node, override)]
        for index in targets:
            if rest:
                _set_path(node[index], rest, value, override)
            else:
                node[index] = value
        return
    if not isinstance(node, dict):
        raise ConfigError(f"override {override!r}: {head!r} is below a scalar value")
    if not rest:
        node[head] = value
        return
    if head == "stages" and head not in node:
        node[head] = [{}]
    _set_path(node.setdefault(head, {}), rest, value, override)


def _list_index(head: str, node: list[Any], override: str) -> int:
    if not head.isdigit() or int(head) >= len(node):
        raise ConfigError(
            f"override {override!r}: list index {head!r} out of range (the list has {len(node)} items)"
        )
    return int(head)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    values = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, where)  # keeps a nested section's own message
        for option in options:
            try:
                return _coerce(option, value, where)
            except ConfigError:
                continue
        names = " or ".join(getattr(option, "__name__", str(option)) for option in options)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0]
        items = [_coerce(inner, item, f"{where}.{i}") for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or hint is Any:
        return value
    return _scalar(hint, value, where)


def _scalar(hint: type, value: Any, where: str) -> Any:
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
