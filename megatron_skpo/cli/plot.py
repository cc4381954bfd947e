"""``skpo-plot RUN_DIR [RUN_DIR ...] [--metrics reward,accuracy] [--out curves.png]``: learning curves.

One panel per metric, one line per run (labelled by the run directory's name), read from each run's
``metrics.jsonl``. ``--smooth N`` overlays a trailing moving average over N steps on the raw curve.
Example::

    skpo-plot runs/skpo runs/grpo --metrics reward,accuracy,response_len/mean --out skpo_vs_grpo.png
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_skpo.trainer.logging import METRICS_FILE, read_metrics

DEFAULT_METRICS = ("reward", "accuracy")


def load_runs(run_dirs: Sequence[str]) -> dict[str, list[dict]]:
    """{label: records}; a directory without metrics.jsonl is an error naming it."""
    runs: dict[str, list[dict]] = {}
    for d in run_dirs:
        path = Path(d) / METRICS_FILE if Path(d).is_dir() else Path(d)
        if not path.is_file():
            raise FileNotFoundError(f"{d}: no {METRICS_FILE} (expected a run directory written by skpo-train)")
        label = path.parent.name if path.name == METRICS_FILE else path.stem
        if label in runs:  # two .../seed0 directories under different parents stay apart
            label = str(d).rstrip("/")
        n = 2
        while label in runs:
            label, n = f"{str(d).rstrip('/')} #{n}", n + 1
        runs[label] = read_metrics(path)
    return runs


def series(records: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; steps without it and null (non-finite) values are left out."""
    pts = [(r["step"], float(r[metric])) for r in records
           if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)]
    return [s for s, _ in pts], [v for _, v in pts]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (shorter at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def build_figure(runs: dict[str, list[dict]], metrics: Sequence[str], smooth: int = 1, ncols: int = 3):
    """A matplotlib Figure with one Axes per metric and one line per run that logged it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    missing = [m for m in metrics if not any(series(recs, m)[0] for recs in runs.values())]
    if missing:
        available = sorted({k for recs in runs.values() for r in recs for k in r if k != "step"})
        raise ValueError(f"--metrics: no run logged {', '.join(missing)}; available: {', '.join(available)}")
    cols = min(ncols, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for i, (label, recs) in enumerate(runs.items()):
            steps, values = series(recs, metric)
            if not steps:
                continue
            color = f"C{i % 10}"
            if smooth > 1:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, moving_average(values, smooth), color=color, label=label)
            else:
                ax.plot(steps, values, color=color, label=label, marker="." if len(steps) < 40 else None)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="skpo-plot", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric names")
    ap.add_argument("--out", default="curves.png", help="output PNG")
    ap.add_argument("--smooth", type=int, default=1, help="moving-average window in steps (1 = raw)")
    ap.add_argument("--ncols", type=int, default=3, help="panels per row")
    args = ap.parse_args(argv)
    args.metrics = [m for m in args.metrics.split(",") if m]
    if not args.metrics or args.smooth < 1 or args.ncols < 1:
        ap.error("--metrics must name at least one metric; --smooth and --ncols must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        fig = build_figure(load_runs(args.runs), args.metrics, args.smooth, args.ncols)
    except (FileNotFoundError, ValueError) as e:
        print(f"skpo-plot: error: {e}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(args.metrics)} panels, {len(args.runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
