"""The YAML reader of recipes and override values: safe tags only, no alias bombs, no duplicate keys.

``yaml.safe_load`` has two failure modes on a hostile or careless recipe:

- aliases (``*a``) are shared, not copied, so a "billion laughs" document (nine levels of nine
  aliases each) loads in microseconds, and then the config code walks it as a tree of 9**9 values
  until memory runs out. :func:`load_yaml` counts the values the document *expands* to (an alias
  counts as everything it stands for) and refuses more than :data:`MAX_VALUES`, naming the line
  where the bound was crossed; plain anchors and a few aliases (``<<: *defaults``) still work;
- a repeated key (``lr`` twice in ``optim``) silently keeps the last value. Here it is an error
  naming both lines. Keys brought in by a ``<<`` merge may be overridden: that is what merges are for.

Every error is a :class:`ConfigError` of one line: ``<file>: line <n>: <what>``.
"""
from __future__ import annotations

from typing import Any

import yaml

from megatron_skpo.config.base import ConfigError

MAX_VALUES = 100_000  # values a recipe expands to; the largest recipe in configs/ has a few hundred
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """SafeLoader (pure Python: its composer must be ours to bound) that refuses repeated keys."""

    where = "<yaml>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise ConfigError(f"{self.where}: line {line}: duplicate key {key!r} "
                                          f"(first at line {first[key]})")
                    first[key] = line
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    continue
        return super().construct_mapping(node, deep)


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Refuse a document whose aliases expand past :data:`MAX_VALUES` values (iterative: no
    recursion limit to hit on a deep document), naming the line of the node that crossed it."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if not done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
        if sizes[id(node)] > MAX_VALUES:
            raise ConfigError(f"{where}: line {node.start_mark.line + 1}: aliases expand this document to more than "
                              f"{MAX_VALUES} values (an alias bomb?); write the values out instead")


def load_yaml(text: str, where: str) -> Any:
    """Parse ``text`` (one YAML document) as :func:`yaml.safe_load` would, within the bounds above.

    ``where`` names the source in errors (a file path, or ``override 'a.b=...'``).
    """
    loader = _Loader(text)
    loader.where = where
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_expansion(root, where)
        return loader.construct_document(root)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}: {line}not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()
