"""Launch scripts: syntax, the per-node torchrun commands of a simulated 2 x 8 Slurm job, wrappers."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASH = shutil.which("bash") or "/bin/bash"
SCRIPTS = sorted([*REPO.glob("scripts/run_*.sh"), *REPO.glob("scripts/models/*.sh"), REPO / "scripts/lib/launch.sh",
                  REPO / "scripts/convert.sh", REPO / "scripts/eval.sh"])
JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[017-018]",
       "SLURM_GPUS_ON_NODE": "8"}


def bash(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([BASH, *args], env={**base, **(env or {})}, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def node_commands(out: str) -> dict[int, list[str]]:
    cmds = {}
    for line in out.splitlines():
        if line.startswith("# node "):
            rank, cmd = line[len("# node "):].split(": ", 1)
            cmds[int(rank)] = shlex.split(cmd)
    return cmds


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_bash_syntax(script):
    r = bash("-n", str(script))
    assert r.returncode == 0, r.stderr


def test_dry_run_two_nodes_eight_gpus(tmp_path):
    r = bash("scripts/run_7b.sh", "--dry-run", "optim.lr=2e-6", env=JOB)
    assert r.returncode == 0, r.stderr
    cmds = node_commands(r.stdout)
    assert sorted(cmds) == [0, 1]
    for rank, cmd in cmds.items():
        assert cmd[:10] == ["torchrun", "--nnodes=2", "--nproc-per-node=8", f"--node-rank={rank}",
                            "--rdzv-backend=c10d", "--rdzv-endpoint=gpu017:24242", "--rdzv-id=4242",
                            "--max-restarts=0", "-m", "megatron_skpo.cli.train"]
        train = cmd[10:]
        assert train[0] == "configs/skpo.yaml" and train[-1] == "optim.lr=2e-6"  # user overrides last
        assert {"parallel.tp=2", "parallel.pp=1", "model.hf_path=checkpoints/Qwen2.5-Math-7B",
                "checkpoint.resume=true", "checkpoint.dir=runs/qwen2.5-math-7b/checkpoints"} <= set(train)
    assert "tp=2 pp=1 dp=8" in r.stdout
    assert "rollouts on 16 vLLM engines (rollout.tp=1), each generating 1/16 of a step's prompts" in r.stdout
    r = bash("scripts/run_7b.sh", "--dry-run", "rollout.tp=2", env=JOB)
    assert "rollouts on 8 vLLM engines (rollout.tp=2)" in r.stdout
    assert "# per job: srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash" in r.stdout


def test_dry_run_arguments_env_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000150\n")
    env = {**JOB, "SKPO_DRY_RUN": "1", "PP": "2", "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:4"}
    r = bash("scripts/run_llama3b.sh", "--tp", "2", "--run-dir", str(run_dir), env=env)
    assert r.returncode == 0, r.stderr
    cmd = node_commands(r.stdout)[1]
    assert "--nproc-per-node=4" in cmd and {"parallel.tp=2", "parallel.pp=2"} <= set(cmd)
    assert "model.hf_path=checkpoints/Llama-3.2-3B-Instruct" in cmd and f"logging.dir={run_dir}" in cmd
    assert f"resuming from {run_dir}/checkpoints/step_00000150" in r.stdout and "dp=2" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["--tp", "3"], "not divisible by TP x PP = 3"),
    (["--tp", "zero"], "TP must be a positive integer"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
    (["--tp"], "--tp needs a value"),
], ids=["tp-divides", "tp-int", "unknown", "missing-value"])
def test_dry_run_bad_arguments(args, msg):
    r = bash("scripts/run_7b.sh", "--dry-run", *args, env=JOB)
    assert r.returncode == 2 and msg in r.stderr


def test_multi_node_needs_slurm():
    r = bash("scripts/run_7b.sh", "--nodes", "2", "--gpus-per-node", "1")
    assert r.returncode == 2 and "2 nodes need Slurm" in r.stderr


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[017-018]", "gpu017"), ("node7", "node7"), ("a[3,5-6],b1", "a3"), ("c1,d[1-2]", "c1"), ("x[09-10]", "x09"),
])
def test_first_host_fallback_matches_scontrol(nodelist, first, tmp_path):
    """The parser used without a slurm.conf agrees with scontrol (checked when scontrol is installed)."""
    lib = REPO / "scripts/lib/launch.sh"
    fallback = bash("-c", f"source {lib}; skpo_first_host '{nodelist}'", env={"PATH": "/nonexistent"})
    assert fallback.stdout.strip() == first
    if shutil.which("scontrol"):
        conf = tmp_path / "slurm.conf"
        conf.write_text("ClusterName=x\nSlurmctldHost=localhost\n")
        real = bash("-c", f"scontrol show hostnames '{nodelist}' | head -n1", env={"SLURM_CONF": str(conf)})
        assert real.stdout.strip() == first, real.stderr


def test_convert_and_eval_wrappers():
    r = bash("scripts/convert.sh", "--dry-run", "--model-file", "qwen2.5-math-7b", "hf-to-mcore", "--tp=4")
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])
    assert cmd[-8:] == ["hf-to-mcore", "--tp=4", "--hf", "checkpoints/Qwen2.5-Math-7B", "--pp", "1",
                        "--out", "checkpoints/qwen2.5-math-7b-mcore-tp4pp1"]
    r = bash("scripts/convert.sh", "--dry-run", "--model-file", "qwen3-30b-a3b", "hf-to-mcore")
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])  # an MoE model file also sets the expert layout
    assert cmd[-11:] == ["hf-to-mcore", "--hf", "checkpoints/Qwen3-30B-A3B-Base", "--tp", "1", "--pp", "1",
                         "--ep", "8", "--out", "checkpoints/qwen3-30b-a3b-mcore-tp1pp1ep8"]
    r = bash("scripts/eval.sh", "--dry-run", "--model-file", "llama3.2-3b-instruct", "--k", "8")
    cmd = shlex.split(r.stdout.strip())
    assert cmd[-2:] == ["--k", "8"] and "--prompt-template" in cmd  # the user's --k comes last and wins
    assert cmd[cmd.index("--model") + 1] == "checkpoints/Llama-3.2-3B-Instruct"
    assert bash("scripts/eval.sh", "--dry-run", "--k", "2").returncode == 2
    r = bash("scripts/eval.sh", "--model-file", "nope")
    assert r.returncode == 2 and "available: llama3.2-3b-instruct qwen2.5-math-7b" in r.stderr


def test_wrapped_clis_accept_the_flags():
    """The flags the wrappers pass exist in skpo-convert / skpo-eval (argparse would reject others)."""
    from checkpoint_convert.cli import build_parser
    from megatron_skpo.cli.eval import parse_args

    a = build_parser().parse_args(["hf-to-mcore", "--tp=4", "--hf", "x", "--pp", "1", "--out", "y"])
    assert (a.tp, a.pp) == (4, 1)
    r = bash("scripts/eval.sh", "--dry-run", "--model-file", "qwen2.5-math-7b")
    cmd = shlex.split(r.stdout.strip())
    e = parse_args(cmd[next(i for i, a in enumerate(cmd) if a.startswith("--")):])  # after the program
    assert e.prompt_template == "qwen_math" and e.max_tokens == 3072


@pytest.mark.parametrize("model, layout", [("qwen3-8b", (2, 1, 1)), ("qwen3-30b-a3b", (1, 1, 8))])
def test_model_files_launch_a_valid_config(model, layout):
    """A model file's dry run on 2 x 8 GPUs gives skpo-train a config that loads, with the file's layout."""
    from megatron_skpo.config import load_config

    r = bash("-c", f"source scripts/models/{model}.sh && source scripts/lib/launch.sh && skpo_launch --dry-run",
             env=JOB)
    assert r.returncode == 0, r.stderr
    train = node_commands(r.stdout)[0][10:]
    cfg = load_config(REPO / train[0], train[1:])
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep) == layout
    assert cfg.model.hf_path.startswith("checkpoints/Qwen3-") and cfg.logging.dir == f"runs/{model}"
    dp = 16 // (layout[0] * layout[1])
    assert dp % layout[2] == 0, "EP must divide the data-parallel size"


def test_dry_run_with_rollout_nodes_splits_the_job(tmp_path):
    """--rollout-nodes 1 on a 3 x 8 job: torchrun on the first 2 nodes with the disaggregated placement
    (8 external workers at rollout.tp 1, bridge on the rendezvous port + 1), workers on the third."""
    job = {**JOB, "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "gpu[017-019]"}
    r = bash("scripts/run_7b.sh", "--dry-run", "--rollout-nodes", "1", "rollout.max_staleness=1", env=job)
    assert r.returncode == 0, r.stderr
    cmds = node_commands(r.stdout)
    assert sorted(cmds) == [0, 1, 2]
    for rank in (0, 1):
        assert cmds[rank][1:3] == ["--nnodes=2", "--nproc-per-node=8"]
        train = cmds[rank][10:]
        for kv in ("rollout.placement=disaggregated", "rollout.worker_launch=external", "rollout.workers=8",
                   "rollout.bridge_host=gpu017", "rollout.bridge_port=24243", "rollout.max_staleness=1"):
            assert kv in train
    assert "--connect" in cmds[2] and "gpu017:24243" in cmds[2] and "megatron_skpo.trainer.worker" in cmds[2]
    assert "training on the first 2 node(s) (16 GPUs), rollouts on the last 1 node(s): 8 vLLM rollout workers" in r.stdout
    bad = bash("scripts/run_7b.sh", "--dry-run", "--rollout-nodes", "3", env=job)
    assert bad.returncode == 2 and "leaves no training node" in bad.stderr
