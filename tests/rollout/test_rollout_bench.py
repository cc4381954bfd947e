"""``skpo-bench rollout`` end to end on a tiny model (one vLLM engine start)."""
from __future__ import annotations

import json

import pytest
from rollout_fixtures import build_tiny_llama

from megatron_skpo.cli import bench

pytestmark = pytest.mark.slow


def test_rollout_bench_reports_the_ratio(tmp_path, capsys):
    build_tiny_llama(tmp_path)
    argv = ["rollout", "--model", str(tmp_path), "--prompts", "4", "--group-size", "4", "--max-tokens", "48",
            "--two-batch"]
    assert bench.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompts"] == 4 and out["group_size"] == 4 and 8 <= out["mean_t_q"] <= 24  # U[48/6, 48/2]
    for name in ("grpo", "skpo", "skpo_two_batch"):
        run = out[name]
        assert run["seconds"] > 0 and run["cpu_seconds"] > 0 and run["tokens"] > 0
        assert 0 < run["engine_steps"] <= 48 + 3 + (48 if name == "skpo_two_batch" else 0)
        assert run["tokens_per_s"] == pytest.approx(run["tokens"] / run["seconds"])
    assert out["grpo"]["tokens"] <= 4 * 4 * 48
    # SKPO counts every upstream candidate; its batch keeps one segment per prompt
    assert out["skpo"]["tokens"] == out["skpo"]["tokens_upstream"] + out["skpo"]["tokens_downstream"]
    assert out["skpo"]["batch_tokens"] < out["skpo"]["tokens"]
    assert out["time_ratio"] == pytest.approx(out["skpo"]["seconds"] / out["grpo"]["seconds"])
