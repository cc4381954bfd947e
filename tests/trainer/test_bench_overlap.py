"""``skpo-bench overlap`` (its summary of two runs' records) and ``skpo-bench transport`` (a real
broadcast to one receiver process), kept small: the benchmarks themselves run for minutes."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from megatron_skpo.bench import overlap
from megatron_skpo.trainer.logging import MetricsLogger  # noqa: F401  (the records' producer)


def records(step_s: list[float], trainer_idle: float) -> list[dict]:
    return [{"step": i + 1, "time/step": t, "time/rollout": 10.0, "time/train": 12.0, "time/logprobs": 0.0,
             "time/weight_sync": 0.5, "time/trainer_idle": trainer_idle, "time/rollout_idle": 1.0,
             "async/staleness_mean": 1.0 if trainer_idle == 0 else 0.0, "accuracy": 0.5} for i, t in enumerate(step_s)]


def test_summary_leaves_out_warmup_and_the_validating_last_step():
    s = overlap.summarize(records([40.0, 30.0, 22.0, 23.0, 21.0, 99.0], 10.0), warmup=2)
    assert s["seconds_per_step"] == 22.0 and s["steps_timed"] == 3 and s["time/trainer_idle"] == 10.0


def test_run_writes_the_ratio_of_the_two_modes(tmp_path):
    for mode, steps, idle in (("sync", [30.0] * 6, 10.0), ("async", [18.0] * 6, 0.0)):
        d = tmp_path / f"grpo_{mode}"
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"step": 0}] + records(steps, idle)))
    args = argparse.Namespace(recipe="r.yaml", model="m", methods="grpo", steps=6, warmup=2, worker_cpus="0",
                              trainer_cpus="1", out=str(tmp_path), overrides=[], summarize_only=True)
    out = overlap.run(args)
    assert out["ratio"] == pytest.approx(0.6) and out["sync_seconds_per_step"] == 30.0
    assert "| grpo | 30.0 | 18.0 | 0.60 |" in (tmp_path / "table.md").read_text()


def test_transport_bench_broadcasts_to_a_receiver():
    proc = subprocess.run([sys.executable, "-m", "megatron_skpo.cli.bench", "transport", "--size-gb", "0.07",
                           "--bucket-mb", "16", "--repeats", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["bytes"] == 2 * 32 * 2**20 and r["GBps"] > 0 and r["backend"] == "gloo"
