"""A tiny string-keyed registry.

Components (vision encoders, projectors, chat templates, strategies, benchmarks, ...) are chosen by id from a
`Registry`, never by sniffing a path or a model name. An unknown id is an error that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from llavakit.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps ids to objects (classes, factories or values) of one kind.

    Args:
        kind: what the registry holds, used in error messages (e.g. ``"projector"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """Register ``item`` under ``name``; without ``item`` it returns a decorator."""
        if item is not None:
            self._add(name, item)
            return item

        def decorator(obj: T) -> T:
            self._add(name, obj)
            return obj

        return decorator

    def _add(self, name: str, item: T) -> None:
        if name in self._items:
            raise ConfigError(f"{self.kind} id {name!r} is registered twice")
        self._items[name] = item

    def get(self, name: str) -> T:
        """Return the item registered under ``name``; raises `ConfigError` naming the valid ids."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid {self.kind} ids: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        """All registered ids, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
