"""``skpo-analyze``: the paper's analyses as tools (docs/algorithm.md §7).

    skpo-analyze sign-consistency --p 0.4,0.45,0.5,0.55,0.6,0.65,0.7,0.35 --k 8,64,256,4096
    skpo-analyze sign-consistency --balanced 8 --spread 0.1 --json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from megatron_skpo.analysis.sign_consistency import balanced_group, diagnose


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skpo-analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("sign-consistency", help="synthetic MC sign-consistency diagnostic")
    group = sc.add_mutually_exclusive_group()
    group.add_argument("--p", type=_floats, help="success probabilities of the G responses")
    group.add_argument("--balanced", type=int, default=8, help="G of a balanced group around 0.5")
    sc.add_argument("--spread", type=float, default=0.1, help="half-width of the balanced group")
    sc.add_argument("--k", type=_ints, default=[8, 16, 32, 64, 256, 1024, 4096], help="MC sample sizes")
    sc.add_argument("--trials", type=int, default=4000)
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--json", action="store_true", help="one JSON line per K instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    p = torch.tensor(args.p, dtype=torch.float64) if args.p else balanced_group(args.balanced, args.spread)
    try:
        rows = diagnose(p, args.k, trials=args.trials, seed=args.seed)
    except ValueError as e:
        print(f"skpo-analyze: {e}", file=sys.stderr)
        return 2
    if args.json:
        for row in rows:
            print(json.dumps(dataclasses.asdict(row)))
        return 0
    print(f"p = {[round(v, 4) for v in p.tolist()]}  ({args.trials} trials)")
    print("| K | MC sign acc | MC all G right | MC MAE | GRPO sign acc | GRPO MAE |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.k} | {r.sign_accuracy:.3f} | {r.all_signs_right:.3f} | {r.mc_mae:.3f} "
              f"| {r.grpo_sign_accuracy:.3f} | {r.grpo_mae:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
