"""``skpo-bench``: the dispatcher and the logprob/step benchmarks print one JSON line each."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_skpo.cli import bench


def test_dispatcher_discovers_bench_modules():
    assert {"logprob", "step"} <= set(bench.benchmarks())


def test_logprob_bench_small(capsys):
    assert bench.main(["logprob", "--tokens", "256", "--hidden", "32", "--vocab", "2048",
                       "--chunk", "32", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in ("fused_seconds", "naive_seconds", "fused_peak_bytes", "naive_peak_bytes"):
        assert result[key] > 0, key
    # naive holds several [T, V] fp32 tensors (2 MiB each); fused only [chunk, V] ones
    assert result["naive_peak_bytes"] >= 3 * 256 * 2048 * 4
    assert result["fused_peak_bytes"] < result["naive_peak_bytes"] / 4
    # counted: its two fp32 [chunk, V] work buffers (kept across calls on CPU) and the weight gradient [V, H]
    assert result["fused_peak_bytes"] >= 2 * 32 * 2048 * 4 + 2048 * 32 * 4
    assert result["max_abs_diff_logp"] < 1e-4 and result["max_abs_diff_grad_weight"] < 1e-4


@pytest.mark.slow
def test_step_bench_cpu_subprocess():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "megatron_skpo.cli.bench", "step", "--seq-len", "32",
                          "--micro-batch-tokens", "64", "--steps", "1"],
                         capture_output=True, text=True, timeout=300, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens_per_step"] == 128 and result["tokens_per_second"] > 0
    assert result["mfu"] is None  # no GPU: no peak to compare with
