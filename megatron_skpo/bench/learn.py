"""``skpo-bench learn``: does the method make the model better, and how does SKPO compare with its
baselines at an equal budget of sampled tokens?

Each (method, seed) trains the task recipe (default ``configs/demo_cpu.yaml``: SmolLM2-135M-Instruct,
few-shot easy MAWPS, G = 8) with ``algo.name=<method>`` until it has sampled
``--token-budget`` tokens (every phase, SKPO's discarded candidates and Monte Carlo continuations
included), validating avg@k on the held-out set (``data.eval``) before the first step, every
``--eval-every`` steps and at the end. Runs are separate ``skpo-train`` processes writing under
``--out/<method>/seed<s>``; a finished run is not repeated, an interrupted one resumes from its
checkpoint; ``--report`` trains nothing and summarises the finished runs; ``--merge`` takes finished
runs from an earlier ``results.json`` (a queue split over machines or sessions), and ``--variant`` names
an ablation (a method with its own overrides) that ``--methods`` can list beside the plain methods.
The result: ``results.json`` (every curve, final numbers per run, mean and spread per method, each
method at the last validated step every run reached, sampled tokens a step by phase), ``curves.png``
(held-out avg@k against sampled tokens and against steps: mean and the seeds' min-max band per
method) and ``table.md``.

Methods at equal rows per step: SKPO, GRPO and CISPO sample ``prompts_per_step`` x G rows; SPO
samples G x as many prompts with one response each; dense MC adds K continuations from M
prefixes of every response (``--dense-mc-k``, ``--dense-mc-m``), so it takes fewer steps.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("skpo", "grpo", "cispo", "spo", "dense_mc")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "demo_cpu.yaml"), help="the task recipe")
    parser.add_argument("--model", default=str(ROOT / ".cache" / "smollm2-135m-instruct"), help="HF model dir")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated algo names")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--token-budget", type=int, default=40_000, help="sampled tokens per run")
    parser.add_argument("--max-steps", type=int, default=200, help="hard cap on steps per run")
    parser.add_argument("--eval-every", type=int, default=5, help="validation interval in steps")
    parser.add_argument("--dense-mc-k", type=int, default=2, help="dense MC continuations per prefix")
    parser.add_argument("--dense-mc-m", type=int, default=2, help="dense MC prefixes per response")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_learn"), help="run directories and results")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: summarise the runs of --methods x --seeds under --out that finished "
                             "(others are listed as missing), e.g. while a long queue still runs")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 steps' worth of tokens, validation k=1 on 4 problems")
    parser.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME=METHOD:KEY=VAL,...",
                        help="a named ablation to list in --methods: METHOD with these overrides (repeatable), "
                             "e.g. skpo_wup0.25=skpo:algo.skpo.w_up=0.25,algo.skpo.w_down=0.75")
    parser.add_argument("--merge", action="append", default=[], metavar="RESULTS_JSON",
                        help="an earlier results.json (another machine's, say): its runs count as finished for the "
                             "(method, seed) pairs not finished under --out (repeatable; the first file wins)")
    parser.add_argument("overrides", nargs="*", default=[], help="extra key=value overrides for every run")


@dataclass(frozen=True)
class Variant:
    """A named run configuration: ``method`` (an algo name) with ``overrides`` applied last."""

    name: str
    method: str
    overrides: tuple[str, ...]


def parse_variant(text: str) -> Variant:
    """``NAME=METHOD:KEY=VAL,KEY=VAL`` (argparse type)."""
    name, sep, rest = text.partition("=")
    method, colon, over = rest.partition(":")
    overrides = tuple(o.strip() for o in over.split(",") if o.strip())
    if not sep or not colon or not overrides or not all("=" in o for o in overrides):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=METHOD:KEY=VAL[,KEY=VAL...]")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in METHODS:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: NAME must be letters, digits, '_', '.', '-' (it names "
                                         "the run directory) and not a method's own name")
    if not re.fullmatch(r"[a-z0-9_]+", method):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: METHOD {method!r} is not an algo name")
    return Variant(name, method, overrides)


def resolve_methods(methods: str, variants: list[Variant]) -> dict[str, Variant]:
    """Each label of ``--methods`` as a Variant (a plain algo name has no extra overrides)."""
    named = {v.name: v for v in variants}
    if len(named) != len(variants):
        raise SystemExit("skpo-bench learn: --variant names must be distinct")
    return {m: named.get(m, Variant(m, m, ())) for m in methods.split(",")}


def load_merged(paths: list[str], args) -> dict[str, dict[int, dict]]:
    """Finished runs from earlier ``results.json`` files, checked against this bench's budget (the
    validation metric is checked once every run is in, ``run``)."""
    merged: dict[str, dict[int, dict]] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"skpo-bench learn: --merge {path}: cannot read it as results.json ({e})")
        if data.get("bench") != "learn" or not isinstance(data.get("runs"), dict):
            raise SystemExit(f"skpo-bench learn: --merge {path}: not a results.json of skpo-bench learn")
        if data.get("token_budget") != args.token_budget:
            raise SystemExit(f"skpo-bench learn: --merge {path}: token_budget is {data.get('token_budget')}, this "
                             f"bench's --token-budget is {args.token_budget}; merge only runs of the same budget")
        for method, runs in data["runs"].items():
            for seed, run in runs.items():
                merged.setdefault(method, {}).setdefault(int(seed), {**run, "merged_from": str(path)})
    return merged


def shared_overrides(args, method: str) -> list[str]:
    """The overrides for every run that apply to ``method``: G is the group methods' knob; SPO's G is 1
    by definition (it samples G x the prompts instead)."""
    return [o for o in args.overrides if not (method == "spo" and o.startswith("algo.group_size="))]


def check_configs(args, variants) -> None:
    """Every method's and variant's config loads, before the first run: a bad override or algo name
    fails now, not after the hours of runs queued before it."""
    from megatron_skpo.config import ConfigError, load_config

    for v in variants:
        try:
            load_config(args.recipe, [f"model.hf_path={args.model}", *shared_overrides(args, v.method),
                                      f"algo.name={v.method}", *v.overrides])
        except ConfigError as e:
            raise SystemExit(f"skpo-bench learn: {v.name}: {e}") from None


def method_overrides(method: str, args, prompts_per_step: int, group_size: int) -> list[str]:
    """``algo.name`` and what equal rows per step need for ``method``."""
    out = [f"algo.name={method}"]
    if method == "spo":  # one response per prompt: G x the prompts
        n = prompts_per_step * group_size
        out += [f"train.prompts_per_step={n}", f"train.mini_batch_prompts={n}"]
    if method == "dense_mc":
        out += [f"algo.dense_mc.num_rollouts={args.dense_mc_k}", f"algo.dense_mc.num_positions={args.dense_mc_m}"]
    return out


def run_one(args, variant: Variant, seed: int, run_dir: Path) -> dict:
    """Train one (variant, seed) unless it already finished; returns its summary."""
    from megatron_skpo.config import load_config

    method = variant.method
    base = load_config(args.recipe, [f"model.hf_path={args.model}", *args.overrides, *variant.overrides])
    extra = shared_overrides(args, method)
    # absolute paths: skpo-train runs in the package root, not in the caller's working directory
    run_dir, model = run_dir.resolve(), Path(args.model).resolve()
    overrides = [f"model.hf_path={model}", f"logging.dir={run_dir}", f"train.seed={seed}",
                 f"rollout.seed={seed}", f"data.shuffle_seed={seed}", f"train.steps={args.max_steps}",
                 f"train.max_sampled_tokens={args.token_budget}", f"validation.interval={args.eval_every}",
                 "logging.progress=false", "checkpoint.save_interval=5", "checkpoint.keep_last=1",
                 *extra, *method_overrides(method, args, base.train.prompts_per_step, base.algo.group_size),
                 *variant.overrides]
    if args.quick:
        overrides += ["validation.k=1", "data.eval.limit=4"]
    done = run_dir / "DONE"
    if not done.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        t0 = time.perf_counter()
        with open(run_dir / "train.log", "a") as log:
            proc = subprocess.run([sys.executable, "-m", "megatron_skpo.cli.train", args.recipe, *overrides],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"{variant.name} seed {seed}: skpo-train exited {proc.returncode}; "
                               f"see {run_dir / 'train.log'}")
        done.write_text(json.dumps({"seconds": time.perf_counter() - t0}) + "\n")
    return summarize_run(run_dir, json.loads(done.read_text())["seconds"])


def summarize_run(run_dir: Path, seconds: float) -> dict:
    """The run's validation curve (sampled tokens -> avg@k) and its final numbers."""
    from megatron_skpo.trainer.logging import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    key = next((k for r in records for k in r if k.startswith("val/avg@")), None)
    if key is None:
        raise RuntimeError(f"{run_dir}: no validation metrics (does the recipe set data.eval?)")
    curve = [(r.get("sampled_tokens", 0.0), r[key], r[key.replace("avg@", "pass@")]) for r in records if key in r]
    steps = [r for r in records if r["step"] > 0]
    mean = lambda k: statistics.mean(r.get(k, 0.0) for r in steps) if steps else 0.0  # noqa: E731
    phases = sorted({k for r in steps for k in r if k.startswith("tokens/")})
    return {"curve": curve, "curve_steps": [(r["step"], r[key]) for r in records if key in r],
            "metric": key, "steps": len(steps), "seconds": seconds,
            "sampled_tokens": steps[-1]["sampled_tokens"] if steps else 0.0,
            "tokens_per_step": mean("rollout/generated_tokens_all"),
            "phase_tokens_per_step": {k.removeprefix("tokens/"): mean(k) for k in phases},
            "start": curve[0][1], "final": curve[-1][1], "gain": curve[-1][1] - curve[0][1],
            "train_accuracy": [r["accuracy"] for r in steps],
            "step_seconds": statistics.median(r["time/step"] for r in steps) if steps else 0.0}


def aggregate(results: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per method: mean and spread of the start, final and gain over seeds, and steps taken."""
    out = {}
    for method, runs in results.items():
        col = lambda k: [r[k] for r in runs.values()]  # noqa: E731
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        out[method] = {"seeds": sorted(runs), "start_mean": statistics.mean(col("start")),
                       "final_mean": statistics.mean(col("final")), "final_std": sd(col("final")),
                       "gain_mean": statistics.mean(col("gain")), "gain_std": sd(col("gain")),
                       "gain_min": min(col("gain")), "gain_max": max(col("gain")),
                       "steps_mean": statistics.mean(col("steps")), "step_seconds": statistics.mean(col("step_seconds")),
                       "tokens_per_step": statistics.mean(col("tokens_per_step")),
                       "phase_tokens_per_step": _mean_dicts(col("phase_tokens_per_step")),
                       "minutes_mean": statistics.mean(col("seconds")) / 60}
    return out


def common_step(results: dict[str, dict[int, dict]]) -> int:
    """The last validated step every run reached (0 if none): the equal-steps column."""
    steps = [{s for s, _ in r["curve_steps"]} for runs in results.values() for r in runs.values()]
    shared = set.intersection(*steps) if steps else set()
    return max(shared) if shared else 0


def at_step(results: dict[str, dict[int, dict]], step: int) -> dict[str, tuple[float, float]]:
    """Per method: mean and std over seeds of the held-out metric at validated step ``step``."""
    out = {}
    for method, runs in results.items():
        xs = [dict(r["curve_steps"])[step] for r in runs.values()]
        out[method] = (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
    return out


def _mean_dicts(dicts: list[dict]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    return {k: statistics.mean(d.get(k, 0.0) for d in dicts) for k in keys}


def phase_line(agg: dict[str, dict]) -> str:
    """Sampled tokens a step per phase, per method (SKPO: kept segments, discarded candidates, downstream)."""
    parts = []
    for m, a in agg.items():
        ph = a["phase_tokens_per_step"]
        if len(ph) > 1:
            parts.append(f"{m}: " + ", ".join(f"{k} {v:,.0f}" for k, v in ph.items()))
    return ("Sampled tokens a step by phase: " + "; ".join(parts) + ".\n") if parts else ""


def markdown(agg: dict[str, dict], metric: str, budget: int, step: int = 0,
             equal_steps: Optional[dict[str, tuple[float, float]]] = None) -> str:
    """The table: per sampled token (the final at the budget) and, with ``equal_steps``, per step (each
    method at the last validated step every run reached)."""
    col = f" at step {step} |" if equal_steps else ""
    lines = [f"Held-out {metric.removeprefix('val/')} (%) after {budget:,} sampled tokens per run; mean over seeds "
             "(std); gain = final - start of the same run" + (f"; at step {step}: every run at the same number of "
                                                              "steps" if equal_steps else "") + ".", "",
             f"| method | seeds | start | final | gain | gain min..max |{col} steps | tokens/step | s/step | min/run |",
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if equal_steps else "") + "---:|---:|---:|---:|"]
    for m, a in agg.items():
        cell = f" {100 * equal_steps[m][0]:.1f} ({100 * equal_steps[m][1]:.1f}) |" if equal_steps else ""
        lines.append(f"| {m} | {len(a['seeds'])} | {100 * a['start_mean']:.1f} | {100 * a['final_mean']:.1f} "
                     f"({100 * a['final_std']:.1f}) | {100 * a['gain_mean']:+.1f} ({100 * a['gain_std']:.1f}) | "
                     f"{100 * a['gain_min']:+.1f}..{100 * a['gain_max']:+.1f} |{cell} {a['steps_mean']:.1f} | "
                     f"{a['tokens_per_step']:,.0f} | {a['step_seconds']:.0f} | {a['minutes_mean']:.1f} |")
    return "\n".join(lines) + "\n" + ("\n" + phase_line(agg) if phase_line(agg) else "")


def run_table(results: dict[str, dict[int, dict]], step: int = 0) -> str:
    """One row per run: start, the value at the equal step (if any), final, steps, tokens a step, and
    where a merged run came from."""
    col, sep = (f" at step {step} |", "---:|") if step else ("", "")
    lines = ["", "Per run (%; from: this --out, or the --merge file the run came from):", "",
             f"| method | seed | start |{col} final | steps | tokens/step | from |",
             f"|---|---:|---:|{sep}---:|---:|---:|---|"]
    for method, runs in results.items():
        for seed, r in sorted(runs.items()):
            at = f" {100 * dict(map(tuple, r['curve_steps']))[step]:.1f} |" if step else ""
            lines.append(f"| {method} | {seed} | {100 * r['start']:.1f} |{at} {100 * r['final']:.1f} | {r['steps']} | "
                         f"{r['tokens_per_step']:,.0f} | {Path(r['merged_from']).name if 'merged_from' in r else 'this'} |")
    return "\n".join(lines) + "\n"


def merged_line(results: dict[str, dict[int, dict]]) -> str:
    """Which runs came from ``--merge`` files (empty if none): a note under the table."""
    by_file: dict[str, list[str]] = {}
    for method, runs in results.items():
        for seed, r in sorted(runs.items()):
            if "merged_from" in r:
                by_file.setdefault(r["merged_from"], []).append(f"{method} seed {seed}")
    return "".join(f"\nTaken from {f} (--merge): {', '.join(rs)}.\n" for f, rs in by_file.items())


def plot(results: dict[str, dict[int, dict]], metric: str, path: Path) -> None:
    """Held-out metric against sampled tokens (left) and against steps (right; on a GPU the decode
    steps, not the tokens, set the time): each method's mean over seeds (interpolated onto a common
    grid) with the seeds' min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, curve, label in ((axes[0], "curve", "sampled tokens"), (axes[1], "curve_steps", "steps")):
        for method, runs in results.items():
            end = min(r[curve][-1][0] for r in runs.values())
            grid = np.linspace(0, end, 25)
            ys = np.stack([np.interp(grid, [c[0] for c in r[curve]], [c[1] for c in r[curve]]) for r in runs.values()])
            ax.plot(grid, 100 * ys.mean(0), label=f"{method} ({len(runs)} seeds)")
            ax.fill_between(grid, 100 * ys.min(0), 100 * ys.max(0), alpha=0.2)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"held-out {metric.removeprefix('val/')} (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"skpo-bench learn: --model {args.model} has no config.json (convert SmolLM2 with "
                         "scripts/demo.sh first, or pass an HF model directory)")
    if args.quick:
        args.token_budget, args.eval_every = min(args.token_budget, 1), 1
    out = Path(args.out)
    methods, seeds = resolve_methods(args.methods, args.variant), [int(s) for s in args.seeds.split(",")]
    merged = load_merged(args.merge, args)
    check_configs(args, methods.values())
    results: dict[str, dict[int, dict]] = {}
    for seed in seeds:  # seed-major: every method has a first seed early
        for method, variant in methods.items():
            run_dir = out / method / f"seed{seed}"
            if not (run_dir / "DONE").is_file() and seed in merged.get(method, {}):
                results.setdefault(method, {})[seed] = merged[method][seed]
                continue
            if args.report and not (run_dir / "DONE").is_file():
                print(f"skpo-bench learn: {method} seed {seed}: not finished, left out", file=sys.stderr, flush=True)
                continue
            results.setdefault(method, {})[seed] = run_one(args, variant, seed, run_dir)
            print(f"skpo-bench learn: {method} seed {seed}: {results[method][seed]['start']:.3f} -> "
                  f"{results[method][seed]['final']:.3f} in {results[method][seed]['steps']} steps",
                  file=sys.stderr, flush=True)
    if not results:
        raise SystemExit(f"skpo-bench learn --report: no finished run of {args.methods} x seeds {args.seeds} under {out}")
    metrics = {r["metric"] for runs in results.values() for r in runs.values()}
    if len(metrics) > 1:  # a merged file validated with another k
        raise SystemExit(f"skpo-bench learn: the runs were validated with different metrics {sorted(metrics)}; "
                         "merge only runs of the same validation.k")
    metric = metrics.pop()
    agg = aggregate(results)
    step = common_step(results)
    equal = at_step(results, step) if step else None
    summary = {"bench": "learn", "recipe": args.recipe, "model": args.model, "token_budget": args.token_budget,
               "metric": metric, "variants": {v.name: {"method": v.method, "overrides": list(v.overrides)}
                                              for v in methods.values() if v.overrides},
               "merged": {m: {str(s): r["merged_from"] for s, r in rs.items() if "merged_from" in r}
                          for m, rs in results.items() if any("merged_from" in r for r in rs.values())},
               "methods": agg, "equal_step": step,
               "at_equal_step": {m: {"mean": v[0], "std": v[1]} for m, v in (equal or {}).items()},
               "runs": {m: {str(s): r for s, r in rs.items()} for m, rs in results.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "table.md").write_text(markdown(agg, metric, args.token_budget, step, equal) + run_table(results, step)
                                  + merged_line(results))
    plot(results, metric, out / "curves.png")
    return {k: v for k, v in summary.items() if k != "runs"}
