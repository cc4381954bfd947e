"""Critique-GRPO's maths and choices: its two losses (hand-worked values and gradients), the pooled
token mean over both phases, the critique and refinement texts, the kept refinement, its credit and
the configurations it refuses."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_skpo.algo.advantages import AdvantageParams
from megatron_skpo.algo.losses import PolicyLossInput, PolicyLossParams
from megatron_skpo.algo.objective import ObjectiveSettings, PhaseCounts, PhaseLoss, phased_objective, pooled_counts
from megatron_skpo.algo.registries import POLICY_LOSSES
from megatron_skpo.algo.tracker import ValueTracker
from megatron_skpo.config import ConfigError, load_config
from megatron_skpo.methods.base import CreditInput
from megatron_skpo.methods.common import CreditSettings
from megatron_skpo.methods.critique import critique_credit
from megatron_skpo.rollout.samplers.critique import choose_refinement, critique_text, fill_refine
from megatron_skpo.rollout.types import RolloutBatch, Sample


def _loss(name, logp, old, adv, params=PolicyLossParams()):
    logp = torch.tensor([logp], dtype=torch.float64, requires_grad=True)
    inp = PolicyLossInput(logp, torch.tensor([old], dtype=torch.float64), torch.tensor([adv], dtype=torch.float64),
                          torch.ones(1, len(adv)))
    loss, stats = POLICY_LOSSES.get(name)(inp, params)
    loss.sum().backward()
    return loss.detach()[0], logp.grad[0], stats


def test_unclipped_is_minus_ratio_times_advantage_without_a_bound():
    """r = 1.5, A = 2: loss -3, d/dlogp = -r A = -3; r = 0.5, A = -1: loss 0.5, gradient 0.5; r = 20
    is not cut (a clip would stop at 1.28)."""
    loss, grad, stats = _loss("unclipped", [math.log(1.5), math.log(0.5), math.log(20.0)], [0.0, 0.0, 0.0],
                              [2.0, -1.0, 1.0])
    torch.testing.assert_close(loss, torch.tensor([-3.0, 0.5, -20.0], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([-3.0, 0.5, -20.0], dtype=torch.float64))
    assert float(stats["clip_high"].sum()) == 0


def test_shaped_prob_is_p_over_p_plus_gamma_of_the_probability_itself():
    """gamma 0.1: p = 0.1 -> f = 0.5, df/dlogp = gamma p / (p + gamma)^2 = 0.25; p = 0.9 -> f = 0.9,
    df/dlogp = 0.09. The old log-probs play no part (another context sampled the tokens)."""
    loss, grad, stats = _loss("shaped_prob", [math.log(0.1), math.log(0.9)], [5.0, -5.0], [1.0, -2.0])
    torch.testing.assert_close(loss, torch.tensor([-0.5, 1.8], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([-0.25, 2 * 0.09], dtype=torch.float64))
    torch.testing.assert_close(stats["prob"], torch.tensor([[0.1, 0.9]], dtype=torch.float64))
    loss3, _, _ = _loss("shaped_prob", [math.log(0.1)], [0.0], [1.0], PolicyLossParams(shaping_gamma=0.3))
    torch.testing.assert_close(loss3, torch.tensor([-0.25], dtype=torch.float64))  # 0.1 / 0.4


def test_phases_of_one_pool_share_one_token_mean():
    """single: A = 1, 2 at r = 1 (losses -1, -2); refine: p = 0.1, A = 1 (loss -0.5). Pooled: one mean over
    the 3 tokens, -3.5 / 3; without the pool each phase is its own mean, -1.5 + -0.5."""
    single = PolicyLossInput(torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64),
                             torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.ones(1, 2))
    refine = PolicyLossInput(torch.full((1, 1), math.log(0.1), dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
                             torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1))
    counts = {"single": PhaseCounts(2, 1), "refine": PhaseCounts(1, 1)}
    pooled = (PhaseLoss("single", "unclipped", "token-mean", pool="g"), PhaseLoss("refine", "shaped_prob", "token-mean", pool="g"))
    loss, _ = phased_objective(pooled, {"single": single, "refine": refine}, counts, ObjectiveSettings())
    assert float(loss) == pytest.approx(-3.5 / 3)
    apart = tuple(PhaseLoss(p.phase, p.loss, p.agg_mode) for p in pooled)
    loss, _ = phased_objective(apart, {"single": single, "refine": refine}, counts, ObjectiveSettings())
    assert float(loss) == pytest.approx(-2.0)
    assert pooled_counts(pooled, counts)["refine"] == PhaseCounts(3, 2)


def test_critique_texts():
    assert critique_text(True, "simple_gt", "42") == "The generated solution is correct."
    assert critique_text(False, "simple") == "The generated solution is incorrect."
    assert critique_text(False, "simple_gt", "42") == "The generated solution is incorrect, the ground truth answer is: 42."
    with pytest.raises(ValueError, match="unknown critique kind"):
        critique_text(False, "cot")


def test_refinement_request_substitutes_once_and_keeps_other_braces():
    got = fill_refine("Q: {problem} A: {response} C: {critique} \\boxed{}", "x {response}", "y {critique}", "z")
    assert got == "Q: x {response} A: y {critique} C: z \\boxed{}"
    with pytest.raises(ValueError, match="exactly once"):
        fill_refine("{problem} {response}", "a", "b", "c")


def test_the_kept_refinement_is_a_correct_one_when_there_is_one():
    g = torch.Generator().manual_seed(0)
    picks = {choose_refinement([False, True, False, True], g) for _ in range(50)}
    assert picks == {1, 3}  # uniformly among the correct ones
    assert {choose_refinement([False, False, False], g) for _ in range(50)} == {0, 1, 2}  # else among all
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [choose_refinement([True] * 5, a) for _ in range(5)] == [choose_refinement([True] * 5, b) for _ in range(5)]


def test_credit_is_reward_minus_the_group_mean_over_initial_and_refinement():
    """G = 4: three initial rows with R = 1, 0, 0 and a refinement with R = 1: mean 0.5, A = +-0.5 on every
    token; the second prompt's four rewards are equal: A = 0."""
    def s(group, resp, phase="single", parent=-1):
        return Sample([1, 2], list(resp), [-0.5] * len(resp), "stop", group, group, phase, parent=parent)

    batch = RolloutBatch([s(0, [3]), s(0, [4, 5]), s(0, [6]), s(0, [7, 8, 9], "refine", 1),
                          s(1, [3]), s(1, [4]), s(1, [5]), s(1, [6], "refine", 4)],
                         stats={"rollout/count_refinements": 6.0, "rollout/count_refinements_correct": 2.0})
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    correct = rewards > 0
    cr = critique_credit(CreditSettings("dr_grpo", AdvantageParams()),
                         CreditInput(batch, rewards, ValueTracker(), {}, correct))
    assert cr.advantages[0].tolist() == [0.5] and cr.advantages[1].tolist() == [-0.5, -0.5]
    assert cr.advantages[3].tolist() == [0.5, 0.5, 0.5]
    assert all(float(cr.advantages[r].abs().sum()) == 0 for r in (4, 5, 6, 7))
    assert cr.metrics["critique/kept_refinement_accuracy"] == 0.5
    assert cr.metrics["critique/refinement_accuracy"] == pytest.approx(1 / 3)
    assert cr.metrics["adv/group/zero_group_rate"] == 0.5


def test_config_refuses_what_critique_grpo_cannot_train():
    cfg = load_config("configs/critique_grpo.yaml", [])
    assert (cfg.algo.advantage, cfg.algo.policy_loss, cfg.algo.loss_agg_mode) == ("dr_grpo", "unclipped", "token-mean")
    # rollout workers grade in their own reward pool (tests/trainer/test_loop.py runs it)
    assert load_config("configs/critique_grpo.yaml", ["rollout.placement=disaggregated"]).rollout.placement == \
        "disaggregated"
    with pytest.raises(ConfigError, match="rollout.max_staleness: Critique-GRPO's refinements"):
        load_config("configs/critique_grpo.yaml", ["rollout.placement=disaggregated", "rollout.max_staleness=1"])
    with pytest.raises(ConfigError, match="max_model_len: 2000 is too short .* = 2176"):  # 1024 + 2 * 512 + 128
        load_config("configs/critique_grpo.yaml", ["rollout.max_prompt_tokens=1024", "rollout.max_response_tokens=512",
                                                   "rollout.max_model_len=2000"])
    with pytest.raises(ConfigError, match="algo.tis.enabled: Critique-GRPO's refinements"):
        load_config("configs/critique_grpo.yaml", ["algo.tis.enabled=true"])
    with pytest.raises(ConfigError, match="token-mean"):
        load_config("configs/critique_grpo.yaml", ["algo.loss_agg_mode=seq-mean-token-mean"])
    with pytest.raises(ConfigError, match="critique"):
        load_config("configs/grpo.yaml", ["algo.critique.critique=simple_gt"])
    with pytest.raises(ConfigError, match=r"\{critique\}"):
        load_config("configs/critique_grpo.yaml", ['algo.critique.template="Q {problem} A {response}"'])


def test_simple_gt_needs_every_gold_answer_before_the_first_step():
    """The trainer binds its grader before step 1: a problem without a gold answer is refused there."""
    from types import SimpleNamespace

    from megatron_skpo.rewards.reference import Reference
    from megatron_skpo.rollout.samplers.critique import CritiqueSampler
    from megatron_skpo.trainer.stages import bind_grader

    sampler = CritiqueSampler(None, 4, 8, critique="simple_gt")
    run = SimpleNamespace(method=SimpleNamespace(sampler=sampler), pool=None,
                          problems=SimpleNamespace(refs=[Reference("3"), Reference("")]))
    with pytest.raises(ValueError, match="problem 1 of data.train has none"):
        bind_grader(run)
    run.problems.refs[1] = Reference("4")
    bind_grader(run)
    assert sampler.grader.answer(1) == "4"
