"""Settings dataclasses that declare, field by field, where in the config tree each value comes from.

A registered variant keeps its plain-number settings in a frozen dataclass beside its function
(``algo.losses.PolicyLossParams``, ``algo.objective.ObjectiveSettings``). Each field names its config
key once, with :func:`setting`, and :func:`from_config` builds the dataclass from a config section
by those keys. A field that declares no key, or a key the section lacks, is an error naming it:
adding a field can never leave it silently at its default because a copy elsewhere forgot it.

The maths never sees the config: it gets the built dataclass of plain numbers. The section is read
duck-typed (attributes), so this module imports nothing from ``config``.
"""
from __future__ import annotations

from dataclasses import MISSING, field, fields
from typing import Any, Callable, Optional

_KEY, _CONVERT = "config_key", "config_convert"


def setting(default: Any, key: str, convert: Optional[Callable[[Any], Any]] = None) -> Any:
    """A dataclass field read from ``key`` (dotted, relative to the section given to :func:`from_config`).

    ``convert`` maps the config value to the field's value (e.g. ``float``, or a sub-section to one
    number); without it the value is copied as is.
    """
    return field(default=default, metadata={_KEY: key, _CONVERT: convert})


def config_key(cls: type, name: str) -> Optional[str]:
    """The config key field ``name`` of ``cls`` declares, or None."""
    return next(f.metadata.get(_KEY) for f in fields(cls) if f.name == name)


def config_keys(cls: type) -> dict[str, str]:
    """Field name -> declared config key, for every field of ``cls`` that declares one."""
    return {f.name: f.metadata[_KEY] for f in fields(cls) if _KEY in f.metadata}


def from_config(cls: type, section: Any, prefix: str = "", **given: Any) -> Any:
    """``cls`` with every field read from ``section`` at its declared key.

    Args:
        cls: a dataclass whose fields are declared with :func:`setting` (or passed in ``given``).
        section: the config section the keys are relative to (e.g. ``cfg.algo``).
        prefix: the section's own dotted path, for error messages (e.g. ``"algo"``).
        given: fields the caller builds itself (e.g. a nested settings dataclass); they are not read.
    Raises:
        TypeError: a field neither declares a key nor is given.
        KeyError: the section has no value at a declared key.
    """
    values = dict(given)
    for f in fields(cls):
        if f.name in given:
            continue
        if _KEY not in f.metadata:
            hint = "" if f.default is MISSING and f.default_factory is MISSING else " (it would silently keep its default)"
            raise TypeError(f"{cls.__name__}.{f.name} declares no config key: declare it with "
                            f"settings.setting(default, key){hint}")
        value = _lookup(section, f.metadata[_KEY], prefix, f"{cls.__name__}.{f.name}")
        convert = f.metadata[_CONVERT]
        values[f.name] = convert(value) if convert is not None else value
    return cls(**values)


def _lookup(section: Any, key: str, prefix: str, owner: str) -> Any:
    node = section
    for part in key.split("."):
        if not hasattr(node, part):
            path = f"{prefix}.{key}" if prefix else key
            raise KeyError(f"{owner} reads config key {path!r}, which the config does not have")
        node = getattr(node, part)
    return node
