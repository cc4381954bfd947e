"""The README's "Learning at one step off" table from the runs of its two ``skpo-bench learn`` commands.

    python scripts/overlap_learning_table.py runs/overlap_learn docs/results/overlap

reads ``<runs>/{sync,async}/<method>/seed<s>`` (finished runs only: a ``DONE`` file) and writes
``learning.json`` (every run's curve and final numbers) and ``learning.md`` (per method and seed: the
start, both finals and their difference; per method the mean difference with its standard error
over the seeds that have both modes).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from megatron_skpo.bench.learn import summarize_run

MODES = ("sync", "async")
KEEP = ("start", "final", "gain", "steps", "curve", "step_seconds", "tokens_per_step")


def collect(runs: Path) -> dict:
    out: dict = {}
    for mode in MODES:
        for done in sorted((runs / mode).glob("*/seed*/DONE")):
            run_dir = done.parent
            summary = summarize_run(run_dir, json.loads(done.read_text())["seconds"])
            method, seed = run_dir.parent.name, run_dir.name.removeprefix("seed")
            out.setdefault(method, {}).setdefault(seed, {})[mode] = {k: summary[k] for k in KEEP if k in summary}
    return out


def table(results: dict) -> str:
    lines = ["| method | seed | start | synchronous final | one-step-off final | difference |",
             "|---|---:|---:|---:|---:|---:|"]
    means = []
    for method in sorted(results, key=lambda m: (m != "grpo", m)):
        diffs = []
        for seed in sorted(results[method], key=int):
            r = results[method][seed]
            start = next(r[m]["start"] for m in MODES if m in r)
            cell = lambda m: f"{100 * r[m]['final']:.1f}" if m in r else "not run"  # noqa: E731
            diff = "-"
            if all(m in r for m in MODES):
                diffs.append(r["async"]["final"] - r["sync"]["final"])
                diff = f"{100 * diffs[-1]:+.1f}"
            lines.append(f"| {method.upper()} | {seed} | {100 * start:.1f} | {cell('sync')} | {cell('async')} | {diff} |")
        if len(diffs) > 1:
            se = statistics.stdev(diffs) / len(diffs) ** 0.5
            means.append(f"{method.upper()}: mean difference {100 * statistics.mean(diffs):+.1f} points "
                         f"(standard error {100 * se:.1f}, {len(diffs)} seeds)")
    return "\n".join(lines) + "\n" + ("\n" + "; ".join(means) + ".\n" if means else "")


def main(argv: list[str]) -> int:
    runs, out = Path(argv[0]), Path(argv[1])
    results = collect(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(results)
    (out / "learning.md").write_text("# Learning at one step off (20 steps, held-out avg@4 on 60 problems)\n\n"
                                     "Commands and reading: README, Results. Per-run curves: "
                                     "[learning.json](learning.json).\n\n" + text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
