"""``skpo-train CONFIG [--dry-run] [--overwrite] [--export-hf DIR] [key=value ...]``: resolve a recipe
and train.

Before anything heavy starts (and with ``--dry-run`` alone) the run is checked: paths, the parallel
layout against the world size and the model, the run directory and the export target
(``trainer/preflight.py``); every problem is printed on one line and nothing starts. A fresh start
never overwrites a previous run in ``logging.dir``: ``--overwrite`` first moves it aside (only a
directory that holds a run, never the model, a data file's directory, a home directory or ``/``).
Rank 0 locks ``logging.dir`` (and ``checkpoint.dir``) before writing anything, so a second run on
the same directory stops with an error naming the first (``trainer/dir_lock.py``).

The resolved config is printed and saved as ``<logging.dir>/config.yaml``, and every start adds a
copy to ``<logging.dir>/config_history/``, so a run can be reproduced from its directory alone.

SIGTERM/SIGINT stop the run at a safe point with a checkpoint when one fits
``checkpoint.signal_grace_s``, one line saying which, and exit status 128 + the signal; no child
process outlives the trainer (``trainer/lifecycle.py``, ``trainer/lifeline.py``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
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
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config, check the run, exit")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a logging.dir that holds a previous run (it is moved to "
                             "<dir>.replaced-<time>, not deleted)")
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
    from megatron_skpo.trainer.preflight import placement_lines, preflight

    if os.environ.get("RANK", "0") == "0":
        for line in placement_lines(cfg, int(os.environ.get("WORLD_SIZE", "1"))):
            print(f"skpo-train: {line}", file=sys.stderr)
    problems = preflight(cfg, args.export_hf, args.overwrite)
    for line in problems:
        print(f"skpo-train: {line}", file=sys.stderr)
    if problems or args.dry_run:
        return 2 if problems else 0
    if os.environ.get("RANK", "0") == "0":
        problems = claim_run_dir(cfg, args.overwrite)
        for line in problems:
            print(f"skpo-train: {line}", file=sys.stderr)
        if problems:
            return 2
    write_config(Path(cfg.logging.dir), text)
    from megatron_skpo.trainer import train  # heavy imports only when training

    return train(cfg, args.export_hf)


def claim_run_dir(cfg: Config, overwrite: bool) -> list[str]:
    """Rank 0: lock the run directories for the life of the process (``trainer/dir_lock.py``), check
    them again under the lock, and with ``overwrite`` move the previous run aside. Other ranks
    write nothing before the process group is up, which rank 0 joins only holding the lock."""
    from megatron_skpo.trainer.dir_lock import DirBusy, lock_run_dirs
    from megatron_skpo.trainer.preflight import checkpoint_root, run_dir_problems, set_aside

    try:
        lock_run_dirs(cfg.logging.dir, checkpoint_root(cfg))
    except DirBusy as e:
        return [str(e)]
    problems = run_dir_problems(cfg, overwrite)  # another run may have finished here since preflight
    if problems:
        return problems
    if overwrite:
        for moved in set_aside(cfg):
            print(f"skpo-train: --overwrite: the previous run is now {moved}", file=sys.stderr)
    return []


def write_config(run_dir: Path, text: str) -> None:
    """``config.yaml`` (this start's config) and a copy in ``config_history/`` (every start's)."""
    if os.environ.get("RANK", "0") != "0":
        return
    history = run_dir / "config_history"
    history.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = len(list(history.glob("*.yaml")))
    (history / f"{n:03d}-{stamp}.yaml").write_text(text)
    (run_dir / "config.yaml").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
