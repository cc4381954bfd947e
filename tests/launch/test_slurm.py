"""The launch scripts under a real single-node Slurm cluster (Debian's slurm-wlm on localhost).

A CPU job submitted with sbatch runs run_7b.sh in dry-run mode inside the allocation (node list,
rendezvous host and node ranks come from the real Slurm environment), then run_llama3b.sh for real
with torchrun running a 2-process gloo all-reduce instead of skpo-train: srun -> launch.sh node ->
torchrun -> c10d rendezvous on the first host.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, missing_binaries

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

JOB = """#!/bin/bash
#SBATCH --job-name=skpo-cpu-test
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=5
#SBATCH --output={out}
set -euo pipefail
cd {repo}
export PATH={bindir}:$PATH OMP_NUM_THREADS=1
echo "== dry run"
bash scripts/run_7b.sh --dry-run --gpus-per-node 8 --tp 2
echo "== real run"
GPUS_PER_NODE=2 SKPO_TORCHRUN_SCRIPT=tests/launch/allreduce.py bash scripts/run_llama3b.sh --run-dir {run_dir}
echo "== done"
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"slurm-wlm is not installed (no {', '.join(missing)}): "
                    "apt-get install -y slurm-wlm")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start(timeout=60)
        yield c
    finally:
        c.stop()


def _wait_job(cluster: SlurmCluster, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cluster.run("scontrol", "show", "job", job_id, check=False).stdout
        state = next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    cluster.run("scancel", job_id, check=False)
    raise TimeoutError(f"job {job_id} did not finish in {timeout} s:\n{cluster.logs()}")


def test_cpu_job_runs_under_slurm(cluster, tmp_path):
    out = tmp_path / "job.out"
    script = tmp_path / "job.sh"
    script.write_text(JOB.format(out=out, repo=shlex.quote(str(REPO)), bindir=Path(sys.executable).parent,
                                 run_dir=tmp_path / "run"))
    job_id = cluster.run("sbatch", "--parsable", str(script), cwd=tmp_path).stdout.strip().split(";")[0]
    state = _wait_job(cluster, job_id, timeout=180)
    text = out.read_text() if out.exists() else ""
    assert state == "COMPLETED", f"job {state}:\n{text}\n{cluster.logs()}"
    host = cluster.host
    dry = text.split("== real run")[0]
    assert (f"# node 0: torchrun --nnodes=1 --nproc-per-node=8 --node-rank=0 --rdzv-backend=c10d "
            f"--rdzv-endpoint={host}:{20000 + int(job_id) % 10000} --rdzv-id={job_id}") in dry
    assert "tp=2 pp=1 dp=4" in dry
    real = text.split("== real run")[1]
    assert (f"skpo-launch: node 0 on {host}: torchrun --nnodes=1 --nproc-per-node=2 --node-rank=0 "
            f"--rdzv-backend=c10d --rdzv-endpoint={host}:") in real  # srun ran launch.sh on the node
    results = sorted(line for line in real.splitlines() if line.startswith("allreduce "))
    assert results == [f"allreduce rank={r} world=2 sum=3 node_rank=0" for r in (0, 1)], text
    assert "== done" in text


TRAIN_JOB = """#!/bin/bash
#SBATCH --job-name=skpo-cpu-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=10
#SBATCH --output={out}
set -euo pipefail
cd {repo}
export PATH={bindir}:$PATH OMP_NUM_THREADS=1
GPUS_PER_NODE=1 bash scripts/run_llama3b.sh --run-dir {run_dir} {overrides}
echo "== done"
"""


def test_cpu_training_job_runs_under_slurm(cluster, tmp_path):
    """The real job: sbatch -> srun -> launch.sh -> torchrun -> skpo-train (SKPO, tiny model, 1 step)."""
    sys.path.insert(0, str(REPO / "tests" / "trainer"))
    from loop_child import build_assets, tiny_overrides

    build_assets(tmp_path)
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_overrides(tmp_path, "unused", 1) if not o.startswith("logging.dir=")]
    out = tmp_path / "train.out"
    script = tmp_path / "train.sh"
    script.write_text(TRAIN_JOB.format(out=out, repo=shlex.quote(str(REPO)), bindir=Path(sys.executable).parent,
                                       run_dir=run_dir, overrides=" ".join(map(shlex.quote, overrides))))
    job_id = cluster.run("sbatch", "--parsable", str(script), cwd=tmp_path).stdout.strip().split(";")[0]
    state = _wait_job(cluster, job_id, timeout=420)
    text = out.read_text() if out.exists() else ""
    assert state == "COMPLETED" and "== done" in text, f"job {state}:\n{text[-4000:]}\n{cluster.logs()}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > 0]  # step 0 holds the data summary
    assert [r["step"] for r in rows] == [1] and "loss/up/loss" in rows[0] and "loss/down/loss" in rows[0]
    assert (run_dir / "checkpoints" / "latest").is_file()


def test_run_script_header_is_accepted_by_sbatch(cluster, tmp_path):
    """sbatch parses run_7b.sh's #SBATCH header (GPU requests are swapped for this CPU-only node)."""
    r = cluster.run("sbatch", "--test-only", "--nodes=1", "--gpus-per-node=0", str(REPO / "scripts/run_7b.sh"),
                    check=False, cwd=tmp_path)
    assert "to start at" in r.stderr, r.stderr


REQUEUE_JOB = """#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=5
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={out}
set -euo pipefail
cd {repo}
export PATH={bindir}:$PATH OMP_NUM_THREADS=1
GPUS_PER_NODE=1 SKPO_TORCHRUN_SCRIPT=tests/launch/sleeper.py exec bash scripts/run_llama3b.sh --run-dir {run_dir}
"""


def test_usr1_requeues_and_reports_resume(cluster, tmp_path):
    """The time-limit signal (#SBATCH --signal=B:USR1@300) makes the batch script requeue its job.

    (Slurm holds a requeued job for about two minutes before it may start again, so the test stops
    at the requeue; the resumed start is the same launch with SLURM_RESTART_COUNT=1.)
    """
    out, run_dir = tmp_path / "job.out", tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000007\n")
    script = tmp_path / "job.sh"
    script.write_text(REQUEUE_JOB.format(out=out, repo=shlex.quote(str(REPO)), run_dir=run_dir,
                                         bindir=Path(sys.executable).parent))
    job_id = cluster.run("sbatch", "--parsable", str(script), cwd=tmp_path).stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 90
        while "sleeper rank=0 restart=0" not in (out.read_text() if out.exists() else ""):
            assert time.monotonic() < deadline, f"job did not start:\n{cluster.logs()}"
            time.sleep(0.5)
        cluster.run("scancel", "--signal=USR1", "--batch", job_id)
        while "Restarts=1" not in cluster.run("scontrol", "show", "job", job_id).stdout:
            assert time.monotonic() < deadline, f"job was not requeued:\n{out.read_text()}"
            time.sleep(0.5)
    finally:
        cluster.run("scancel", job_id, check=False)
    text = out.read_text()
    assert f"resuming from {run_dir}/checkpoints/step_00000007" in text
    assert f"USR1 near the time limit: requeueing job {job_id}" in text
