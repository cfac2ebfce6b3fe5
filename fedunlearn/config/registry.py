"""A small generic registry: names from configs map to factories, with loud errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Map names to factories; raise on duplicates and list the known names on a miss.

    Parameters
    ----------
    kind : str
        What the registry holds, used in error messages (e.g. ``"model"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a duplicate name raises ``ValueError``."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name``."""
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is already registered; pick another name")
        self._items[name] = obj

    def get(self, name: str) -> T:
        """Return the entry for ``name``; an unknown name raises ``KeyError`` listing known ones."""
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        """One-line message for an unknown name."""
        return f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}"

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
