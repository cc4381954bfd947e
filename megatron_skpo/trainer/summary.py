"""``python -m megatron_skpo.trainer.summary RUN_DIR [--before DIR] [--after DIR]``: a run's summary.

Prints rewards per step, mean time per stage, the held-out avg@k the run's own validation measured
before the first and after the last step with the change's standard error (paired over the same
problems), and (given ``skpo-eval`` output directories) their accuracy before and after, as
Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STEP_KEYS = ("reward", "accuracy", "loss/up/loss", "loss/down/loss", "grad_norm")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (did the run start?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def step_table(rows: list[dict]) -> list[str]:
    keys = [k for k in STEP_KEYS if any(k in r for r in rows)]
    out = ["| step | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
    out += [f"| {r.get('step')} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return out


def time_table(rows: list[dict]) -> list[str]:
    keys = sorted({k for r in rows for k in r if k.startswith("time/")})
    out = ["| stage | mean seconds per step |", "|---|---:|"]
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        out.append(f"| {k[5:]} | {sum(vals) / max(len(vals), 1):.2f} |")
    return out


def accuracy_table(before: Path, after: Path) -> list[str]:
    def bench(d: Path) -> dict:
        return {b["benchmark"]: b for b in json.loads((d / "summary.json").read_text())["benchmarks"]}

    b, a = bench(before), bench(after)
    out = ["| benchmark | avg@k before | avg@k after | pass@k before | pass@k after |", "|---|---:|---:|---:|---:|"]
    for name in b:
        if name in a:
            out.append(f"| {name} | {100 * b[name]['avg_at_k']:.1f} | {100 * a[name]['avg_at_k']:.1f} "
                       f"| {100 * b[name]['pass_at_k']:.1f} | {100 * a[name]['pass_at_k']:.1f} |")
    return out


def validation_change(run_dir: Path) -> list[str]:
    """The first and the last validation of the run (``<run>/validation/step_*.json``), paired."""
    from megatron_skpo.eval.metrics import paired_change

    files = sorted((run_dir / "validation").glob("step_*.json"))
    if len(files) < 2:
        return []
    first, last = (json.loads(f.read_text()) for f in (files[0], files[-1]))
    c = paired_change(first["correct"], last["correct"])
    k = first["k"]
    return [f"| held-out | step {first['step']} | step {last['step']} | change | standard error | z |",
            "|---|---:|---:|---:|---:|---:|",
            f"| avg@{k} over {c.problems} problems | {100 * c.before:.1f} | {100 * c.after:.1f} | "
            f"{100 * c.change:+.1f} | {100 * c.stderr:.1f} | {c.z:.1f} |"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_skpo.trainer.summary", description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--before", type=Path, help="skpo-eval output before training")
    ap.add_argument("--after", type=Path, help="skpo-eval output after training")
    args = ap.parse_args(argv)
    try:
        rows = read_metrics(args.run_dir)
        rows = [r for r in rows if r.get("step", 0) > 0]  # step 0: data accounting and the starting validation
        lines = ["rewards per step:", *step_table(rows), "", "time per stage:", *time_table(rows)]
        if change := validation_change(args.run_dir):
            lines += ["", "held-out accuracy (the run's validation, paired over the same problems):", *change]
        if args.before and args.after:
            lines += ["", "held-out accuracy:", *accuracy_table(args.before, args.after)]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        print(f"summary: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
