"""``skpo-train CONFIG [--dry-run] [--export-hf DIR] [key=value ...]``: resolve a recipe and train.

The resolved config is printed and saved (``<logging.dir>/config.yaml``) with every run, so a run
can be reproduced from its directory alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_skpo.config import Config, ConfigError, describe, dump_config, load_config


def build_parser() -> argparse.ArgumentParser:
    tree = "\n".join(describe(Config))
    parser = argparse.ArgumentParser(
        prog="skpo-train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an LLM reasoner with SKPO or a GRPO-family baseline.",
        epilog="overrides are dotted keys, e.g. algo.group_size=16 optim.lr=2e-6\n\n"
        "config tree (key: default  # help):\n" + tree,
    )
    parser.add_argument("config", nargs="?", help="YAML recipe (configs/*.yaml); defaults if omitted")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--export-hf", metavar="DIR", default=None,
                        help="write the final policy as an HF checkpoint to DIR (overrides checkpoint.export_hf)")
    return parser


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from the rest so they may appear anywhere."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    rest = [a for a in argv if a not in overrides]
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    rest, overrides = split_args(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(rest)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"skpo-train: config error: {e}", file=sys.stderr)
        return 2
    text = dump_config(cfg)
    print(text, end="")
    if args.dry_run:
        return 0
    run_dir = Path(cfg.logging.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(text)
    from megatron_skpo.trainer import train  # heavy imports only when training

    return train(cfg, args.export_hf)


if __name__ == "__main__":
    sys.exit(main())
