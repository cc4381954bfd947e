"""``skpo-bench overlap``: what overlapping generation and training buys (rollout.max_staleness).

Each method trains the task recipe (default ``configs/demo_cpu.yaml``: SmolLM2-135M-Instruct, 8
prompts x G=8, 64-token answers) twice with the SAME placement -- disaggregated, the rollout worker
pinned to ``--worker-cpus`` and the trainer to ``--trainer-cpus`` (one core each on a 2-core
machine, torch and vLLM threads bound) -- once synchronously (``max_staleness`` 0: the trainer
waits for each step's rollouts, the worker waits for each update) and once one-step-off (1: step
n + 1 is generated while step n trains). Validation and checkpoints are off; the rollouts are the
same sizes in both modes (the same prompts, G and caps).

Seconds per step: the median ``time/step`` over the steps after ``--warmup`` (the first steps pay
for the engine's warm-up and, one-step-off, for the first batch, which nothing overlaps), the last
step left out (it validates once on the recipe's held-out set). The
result, one JSON line: per method ``sync_seconds_per_step``, ``async_seconds_per_step``, ``ratio``
(async / sync: 0.5 is perfect overlap of two equal halves, 1.0 none) and where the time went
(generation, update, weight sync, each side's idle time); ``ratio`` at the top is the largest
method's. Written to ``--out``: ``results.json`` and ``table.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODES = {"sync": 0, "async": 1}
BREAKDOWN = ("time/generate", "time/rollout", "time/train", "time/logprobs", "time/weight_sync",
             "time/trainer_idle", "time/rollout_idle", "time/rollout_weight_load", "time/rewards", "time/drift")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "demo_cpu.yaml"), help="the task recipe")
    parser.add_argument("--model", default=str(ROOT / ".cache" / "smollm2-135m-instruct"), help="HF model dir")
    parser.add_argument("--methods", default="grpo,skpo", help="comma-separated algo names")
    parser.add_argument("--steps", type=int, default=8, help="steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--worker-cpus", default="0", help="rollout worker cores (rollout.worker_cpus)")
    parser.add_argument("--trainer-cpus", default="1", help="trainer cores (rollout.trainer_cpus)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_overlap"), help="run directories and results")
    parser.add_argument("--summarize-only", action="store_true", help="re-read the runs under --out, train nothing")
    parser.add_argument("overrides", nargs="*", default=[], help="extra key=value overrides for every run")


def run_one(args, method: str, staleness: int, run_dir: Path) -> dict:
    """Train one (method, mode) from scratch; returns its per-step records."""
    from megatron_skpo.trainer.logging import read_metrics

    if args.summarize_only:
        return {"steps": [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > 0]}

    cpus = len(args.trainer_cpus.replace("-", ",").split(","))
    overrides = [f"model.hf_path={args.model}", f"logging.dir={run_dir}", f"algo.name={method}",
                 f"train.steps={args.steps}", "validation.interval=0", "validation.at_start=false",
                 "checkpoint.enabled=false", "logging.progress=false", "logging.tensorboard=false",
                 "rollout.placement=disaggregated", f"rollout.max_staleness={staleness}",
                 f"rollout.worker_cpus={args.worker_cpus}", f"rollout.trainer_cpus={args.trainer_cpus}",
                 *args.overrides]
    if (run_dir / "metrics.jsonl").is_file():  # this benchmark's own earlier run
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(cpus)}
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "megatron_skpo.cli.train", args.recipe, *overrides],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} max_staleness={staleness}: skpo-train exited {proc.returncode}; "
                           f"see {run_dir / 'train.log'}")
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > 0]
    return {"steps": steps, "wall_seconds": time.perf_counter() - t0}


def summarize(steps: list[dict], warmup: int) -> dict:
    timed = steps[warmup:-1] or steps  # the last step also validates (data.eval) once
    med = lambda k: statistics.median(r.get(k, 0.0) for r in timed)  # noqa: E731
    return {"seconds_per_step": med("time/step"), "steps_timed": len(timed),
            **{k: med(k) for k in BREAKDOWN},
            "staleness_mean": statistics.mean(r.get("async/staleness_mean", 0.0) for r in timed),
            "accuracy_mean": statistics.mean(r["accuracy"] for r in steps)}


def markdown(result: dict) -> str:
    lines = ["| method | sync s/step | one-step-off s/step | ratio | generation s | update s | trainer idle s "
             "(sync / async) | rollout idle s (sync / async) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in result["methods"].items():
        s, a = r["sync"], r["async"]
        lines.append(f"| {m} | {r['sync_seconds_per_step']:.1f} | {r['async_seconds_per_step']:.1f} | "
                     f"{r['ratio']:.2f} | {s['time/rollout']:.1f} | {s['time/train'] + s['time/logprobs']:.1f} | "
                     f"{s['time/trainer_idle']:.1f} / {a['time/trainer_idle']:.1f} | "
                     f"{s['time/rollout_idle']:.1f} / {a['time/rollout_idle']:.1f} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    if not args.summarize_only and not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"skpo-bench overlap: --model {args.model} has no config.json (convert SmolLM2 with "
                         "scripts/demo.sh first, or pass an HF model directory)")
    if args.steps <= args.warmup + 1:
        raise SystemExit(f"skpo-bench overlap: --steps {args.steps} must exceed --warmup {args.warmup} + 1")
    out, methods = Path(args.out), {}
    for method in args.methods.split(","):
        modes = {}
        for mode, k in MODES.items():  # side by side: the two modes of a method run back to back
            modes[mode] = summarize(run_one(args, method, k, out / f"{method}_{mode}")["steps"], args.warmup)
            print(f"skpo-bench overlap: {method} {mode}: {modes[mode]['seconds_per_step']:.2f} s/step",
                  file=sys.stderr, flush=True)
        sync, asyn = modes["sync"]["seconds_per_step"], modes["async"]["seconds_per_step"]
        methods[method] = {"sync_seconds_per_step": sync, "async_seconds_per_step": asyn, "ratio": asyn / sync, **modes}
    result = {"bench": "overlap", "recipe": args.recipe, "steps": args.steps, "warmup": args.warmup,
              "worker_cpus": args.worker_cpus, "trainer_cpus": args.trainer_cpus, "methods": methods,
              "ratio": max(m["ratio"] for m in methods.values())}
    first = next(iter(methods.values()))
    result.update(sync_seconds_per_step=first["sync_seconds_per_step"],
                  async_seconds_per_step=first["async_seconds_per_step"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "table.md").write_text(markdown(result))
    return result
