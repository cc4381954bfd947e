"""Typed config plumbing: documented fields, strict dict -> dataclass building, dotted overrides.

Every config section is a dataclass whose fields are declared with :func:`doc`, so the tree can be
printed with defaults and help text (``skpo-train --help``). Building from YAML is strict: unknown
keys and values of the wrong type are errors naming the dotted path of the field.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted field path."""


def doc(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """Declare a config field with its help text (shown by ``skpo-train --help``)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def check(cond: bool, path: str, msg: str) -> None:
    """Raise ConfigError naming ``path`` unless ``cond`` holds (for ``__post_init__`` checks)."""
    if not cond:
        raise ConfigError(f"{path}: {msg}")


def check_choice(path: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    check(value in choices, path, f"got {value!r}; allowed values: {', '.join(map(repr, choices))}")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check (and minimally coerce) ``value`` against the annotation ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        check_choice(path, value, get_args(tp))
        return value
    if origin in (list, tuple):
        check(isinstance(value, (list, tuple)), path, f"expected a list, got {value!r}")
        (inner, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        check(isinstance(value, dict), path, f"expected a mapping, got {value!r}")
        _, vt = get_args(tp) or (Any, Any)
        return {k: _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        check(isinstance(value, dict), path, f"expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if tp is bool:
        check(isinstance(value, bool), path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string: accept it as a number
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        check(isinstance(value, (int, float)) and not isinstance(value, bool), path, f"expected a number, got {value!r}")
        # no field means anything by inf or nan: optim.lr=.inf used to train and save NaN weights
        check(math.isfinite(value), path, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, int) and not isinstance(value, bool):  # `rollout.worker_cpus=0` reads 0 as a number
            return str(value)
        check(isinstance(value, str), path, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {tp!r}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            raise ConfigError(
                f"{path + '.' if path else ''}{key}: unknown key; {cls.__name__} has: {', '.join(sorted(names))}"
            )
    kwargs = {k: _coerce(v, hints[k], f"{path + '.' if path else ''}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if path and not str(e).startswith(path):
            raise ConfigError(f"{path}.{e}") from None
        raise


def to_dict(cfg: Any) -> Any:
    """Plain nested dict (YAML-serialisable) of a config tree."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def apply_override(data: dict, dotted: str, value: Any, root_cls: type) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted='a.b.c'``, validating the path against the tree."""
    keys = dotted.split(".")
    cls, node = root_cls, data
    for i, key in enumerate(keys):
        sub = ".".join(keys[: i + 1])
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ConfigError(f"{sub}: {'.'.join(keys[:i])} is not a section")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if key not in fields:
            raise ConfigError(f"{sub}: unknown key; {cls.__name__} has: {', '.join(sorted(fields))}")
        if i == len(keys) - 1:
            node[key] = value
            return
        cls = section_type(get_type_hints(cls)[key])
        node = node.setdefault(key, {})
        if node is None:  # an Optional section the recipe left null: the override creates it
            node = node_parent_set(data, keys[: i + 1], {})
        if not isinstance(node, dict):
            raise ConfigError(f"{sub}: is not a mapping in the recipe")


def section_type(tp: Any) -> Any:
    """``Optional[Section]`` -> ``Section``; any other annotation unchanged."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            return args[0]
    return tp


def node_parent_set(data: dict, keys: list[str], value: Any) -> Any:
    node = data
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return value


def leaf_keys(data: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf of a nested mapping (lists and None are leaves)."""
    if not isinstance(data, dict) or (prefix and not data):
        return {prefix} if prefix else set()
    out: set[str] = set()
    for key, value in data.items():
        out |= leaf_keys(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, mapping by mapping (lists and scalars are replaced whole)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def describe(cls: type, indent: int = 0) -> list[str]:
    """Lines of the config tree with defaults and help text, for ``--help``."""
    lines, pad, hints = [], "  " * indent, get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        section = section_type(tp)
        if dataclasses.is_dataclass(section):
            optional = " (optional section, default null)" if section is not tp else ""
            lines.append(f"{pad}{f.name}:  # {f.metadata.get('help', section.__doc__ or '').strip()}{optional}")
            lines.extend(describe(section, indent + 1))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = to_dict(f.default_factory())  # type: ignore[misc]
        else:
            default = "<required>"
        lines.append(f"{pad}{f.name}: {default!r}  # {f.metadata.get('help', '')}")
    return lines
