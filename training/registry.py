"""Named plug-ins that register themselves: a benchmark or a method is one file that calls `register`.

A registry is tied to a package. The first lookup imports every module of that package, so a new file there is
found without touching any other file; code outside the package (a user's plug-in, a test's toy benchmark)
registers by being imported before the lookup.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Generic, TypeVar

Item = TypeVar("Item")


class Registry(Generic[Item]):
    """name -> item for one kind of plug-in (benchmarks, methods)."""

    def __init__(self, kind: str, package: str) -> None:
        """
        Args:
            kind: what the items are, for messages (`benchmark`, `method`).
            package: dotted package whose modules hold the built-in items.
        """
        self.kind = kind
        self.package = package
        self._items: dict[str, Item] = {}
        self._discovered = False

    def register(self, name: str, item: Item) -> Item:
        """Add `item` under `name`; returns it, so a module can write `THING = REGISTRY.register("x", Thing())`.

        Raises:
            ValueError: another item already holds the name.
        """
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        """Forget `name` (a plug-in being reloaded, a test's toy); unknown names are ignored."""
        self._items.pop(name, None)

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        module = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(module.__path__):
            importlib.import_module(f"{self.package}.{info.name}")

    def get(self, name: str) -> Item:
        """The item registered as `name`.

        Raises:
            KeyError: no such item; the message lists the registered names.
        """
        self._discover()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        """Every registered name, sorted (registration order depends on what was imported first)."""
        self._discover()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._items

    def __iter__(self) -> Iterator[tuple[str, Item]]:
        return iter([(name, self._items[name]) for name in self.names()])
