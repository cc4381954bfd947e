"""``skpo-bench``: benchmark dispatcher. Each subcommand is a module under ``megatron_skpo/bench/``
exposing ``add_args(parser)`` and ``run(args) -> dict``; the result is printed as ONE JSON line.

Adding a benchmark (e.g. ``rollout``, ``convert``) means adding such a module: it is discovered
here by name, nothing else changes.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from types import ModuleType
from typing import Optional, Sequence

import megatron_skpo.bench as bench_pkg


def benchmarks() -> dict[str, ModuleType]:
    """Subcommand name -> module, for every bench module with ``add_args`` and ``run``."""
    found = {}
    for info in pkgutil.iter_modules(bench_pkg.__path__):
        module = importlib.import_module(f"{bench_pkg.__name__}.{info.name}")
        if callable(getattr(module, "add_args", None)) and callable(getattr(module, "run", None)):
            found[info.name] = module
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skpo-bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, module in sorted(benchmarks().items()):
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().split("\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_args(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    result = args._run(args)
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
