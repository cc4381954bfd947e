"""Name -> function registries for every pluggable piece of maths (advantages, losses, ...).

Every caller goes through ``Registry.get``: there is no special-cased variant before the lookup,
and registering a name twice is an error, so two modules cannot silently shadow each other.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Mapping, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A named table of functions that share one signature."""

    def __init__(self, kind: str):
        self.kind = kind
        self._table: dict[str, F] = {}
        self._meta: dict[str, Mapping[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[F], F]:
        """Decorator registering ``fn`` as ``name``; ``meta`` is what the entry declares about itself
        (e.g. a policy loss's ``reads``: the settings it uses), read back with :meth:`meta`."""
        def deco(fn: F) -> F:
            if name in self._table:
                raise ValueError(f"{self.kind} '{name}' is already registered ({self._table[name]!r})")
            self._table[name] = fn
            self._meta[name] = dict(meta)
            return fn

        return deco

    def get(self, name: str) -> F:
        try:
            return self._table[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} '{name}'; registered: {', '.join(sorted(self._table))}"
            ) from None

    def meta(self, name: str) -> Mapping[str, Any]:
        self.get(name)  # the unknown-name error
        return self._meta[name]

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: str) -> bool:
        return name in self._table
