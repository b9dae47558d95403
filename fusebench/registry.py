"""The one registry idiom of both stages: name -> class, filled by a decorator.

`Registry("head")` (fuse/head.py: HEADS, `@register_head("cross_attn")`) and
`Registry("encoder kind")` (extract/encoders.py: ENCODERS, `@register_encoder("clip")`).
Contract: `register(name)` decorates a class and fails loudly on a duplicate name or on an
object `check` refuses (at import time); `get(name)` returns it, or raises the registry's
`UnknownNameError` subclass listing the registered names; `names(pattern)` filters with
fnmatch. Importing this module imports nothing heavy.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import Any


class UnknownNameError(ValueError):
    """A name no registry entry has; the message lists the valid ones."""


class Registry:
    """name -> object, filled by a decorator (`register`). A duplicate name, or an object
    `check` refuses, fails at import time; an unknown name lists the registered ones."""

    def __init__(
        self,
        kind: str,
        check: Callable[[Any, str], None] | None = None,
        error: type[UnknownNameError] = UnknownNameError,
    ) -> None:
        self.kind = kind
        self.check = check
        self.error = error
        self._items: dict[str, Any] = {}
        self._configs: dict[str, dict | Path] = {}

    def register(self, name: str, *, config: dict | str | Path | None = None):
        """Decorator registering a class as `name`. config: its default hyperparameters (a
        mapping, or a YAML file), for an entry without a bundled YAML (a plugin head)."""

        def decorator(obj):
            if name in self._items:
                prev = self._items[name]
                raise ValueError(
                    f"{self.kind} '{name}' is already registered by "
                    f"{prev.__module__}.{prev.__qualname__}; pick another name"
                )
            if self.check is not None:
                self.check(obj, name)
            obj.registry_name = name
            self._items[name] = obj
            if config is not None:
                self._configs[name] = dict(config) if isinstance(config, dict) else Path(config)
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Removes `name` (a plugin registered for a while, e.g. by a test)."""
        self._items.pop(name, None)
        self._configs.pop(name, None)

    def get(self, name: str) -> Any:
        try:
            return self._items[name]
        except KeyError:
            raise self.error(
                f"unknown {self.kind} '{name}'; valid {self.kind}s: {', '.join(self.names())}"
            ) from None

    def config(self, name: str) -> dict | Path | None:
        """The defaults given to register(config=...), or None."""
        return self._configs.get(name)

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._items
