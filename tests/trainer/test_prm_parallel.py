"""PRIME's PRM stage gives the same process rewards and the same PRM update at every layout: one rank,
DP=2, TP=2, PP=2 and TP2 x PP2 (real Megatron PRM and reference over gloo, tiny Llama). Two
mini-batches a step, so the second one's rewards come from the PRM after the first one's update:
equal rewards there mean equal updates."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mp_helpers import spawn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "rollout"))
from test_dp_invariance import fixed_batch  # noqa: E402

pytestmark = pytest.mark.distributed
LAYOUTS = {"dp2": (2, 1, 1), "tp2": (2, 2, 1), "pp2": (2, 1, 2), "tp2pp2": (4, 2, 2)}  # world, tp, pp


def _worker(rank, world, model_dir, tp, pp):
    from megatron_skpo.catalog import build_method
    from megatron_skpo.config import load_config
    from megatron_skpo.model.builder import initialize_parallel
    from megatron_skpo.trainer import build, stages
    from megatron_skpo.trainer.prm import build_prm
    from megatron_skpo.trainer.run import Run

    over = [f"model.hf_path={model_dir}", "model.dtype=fp32", f"parallel.tp={tp}", f"parallel.pp={pp}",
            "algo.name=prime", "algo.group_size=4", "algo.prime.accuracy_lower=0.25", "algo.prime.accuracy_upper=0.75",
            "train.prompts_per_step=4", "train.mini_batch_prompts=2", "optim.lr=1e-3", "optim.warmup_steps=0",
            "optim.adam_eps=1e-3", "parallel.micro_batch_tokens=64", "rollout.max_response_tokens=8",
            "rollout.temperature=0.7"]
    cfg = load_config(None, over)
    initialize_parallel(tp, pp, seed=3)
    hf_config, weights = build.hf_state(str(model_dir))
    run = Run(cfg=cfg, par=build.Parallel.current(), engine=None, tokenizer=None, policy=None,
              reference=build.build_reference(cfg, hf_config, weights), hf_config=hf_config, problems=None,
              validation=None, method=build_method(cfg, None), objective=None, epochs=None, tracker=None, drift=None,
              guard=None, progress=None, record=None, prm=build_prm(cfg, hf_config, weights, 4))
    batch, rewards = fixed_batch("grpo")
    correct = rewards > 0  # groups of 4 with 0, 2 or 3 right: the filter [0.25, 0.75] keeps some, drops some
    process, metrics = stages.process_rewards(run, batch, correct, 4)
    return {"process": {k: v.tolist() for k, v in process.items()}, "metrics": metrics}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rollout_fixtures import build_tiny_model

    d = tmp_path_factory.mktemp("prm") / "model"
    build_tiny_model(d, kv_heads=2)
    return d


@pytest.fixture(scope="module")
def single(model_dir):
    (one,) = spawn(_worker, 1, model_dir, 1, 1)
    return one


def test_single_rank_scores_the_kept_rows_after_an_update(single):
    batch, rewards = fixed_batch("grpo")
    kept = sorted(single["process"])
    groups = {batch.samples[r].group for r in kept}
    assert kept and len(groups) < 4  # the filter dropped at least one prompt and kept at least one
    for r in kept:
        assert len(single["process"][r]) == len(batch.samples[r].response_ids)
    m = single["metrics"]
    assert m["prm/skipped"] == 0 and m["prm/grad_norm"] > 0 and m["prm/loss"] > 0
    # at least one kept row was scored after an update (the second mini-batch): r_t != 0 there
    assert any(abs(x) > 0 for r in kept for x in single["process"][r])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_matches_one_rank(model_dir, single, layout):
    world, tp, pp = LAYOUTS[layout]
    results = spawn(_worker, world, model_dir, tp, pp)
    for r in results:  # every rank holds every kept row's rewards
        assert sorted(r["process"]) == sorted(single["process"])
        for row, values in single["process"].items():
            torch.testing.assert_close(torch.tensor(r["process"][row]), torch.tensor(values), atol=2e-6, rtol=1e-4)
        for k in ("prm/loss", "prm/grad_norm", "prm/accuracy"):
            assert r["metrics"][k] == pytest.approx(single["metrics"][k], rel=2e-5, abs=1e-7), k
