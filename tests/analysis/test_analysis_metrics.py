"""The maths of the model-based analyses, on hand-worked values (docs/algorithm.md §7)."""
import math

import pytest
import torch

from megatron_skpo.analysis.implicit_advantage import interior_positions, per_run_rates, summarize as implicit_summary
from megatron_skpo.analysis.metrics import (
    NO_ANSWER, AnswerCodes, all_same_outcome, answer_key, bypass, cut_position, distinct_answers,
    implicit_advantage, modal_answer, nanmean, relative_positions, skpo_cut)
from megatron_skpo.analysis.shortcut import summarize_condition
from megatron_skpo.analysis.sign_consistency import sign_stats, sign_stats_by_key, sign_stats_by_position
from megatron_skpo.analysis.sign_model import position_fracs, summarize as sign_summary

NAN = float("nan")


@pytest.mark.parametrize("raw, key", [
    ("8", "8"), ("8.0", "8"), ("8.", "8"), ("+8", "8"), ("8 apples", "8"), ("$8$", "8"), ("eight", "8"),
    ("1,000", "1000"), ("0.50", "0.5"), ("3/4", "3/4"), ("x +  1", "x + 1"), (None, None), ("", None),
])
def test_answer_key_canonical_forms(raw, key):
    assert answer_key(raw) == key


def test_answer_codes_share_ids_across_calls():
    codes = AnswerCodes()
    assert codes.encode(["8", "9", None, "8.0"]) == [0, 1, NO_ANSWER, 0]
    assert codes.encode(["9 birds", "10"]) == [1, 2]


def test_distinct_answers_ignore_no_answer():
    ids = torch.tensor([[0, 0, 1, -1], [-1, -1, -1, -1], [2, 3, 4, 5], [7, 7, 7, 7]])
    assert distinct_answers(ids).tolist() == [2, 0, 4, 1]


def test_all_same_outcome_is_the_zero_advantage_condition():
    correct = torch.tensor([[True, True, True], [False, False, False], [True, False, True]])
    assert all_same_outcome(correct).tolist() == [True, True, False]


def test_modal_answer_ties_go_to_the_first_sampled():
    ids = torch.tensor([[1, 2, 2, 1],    # 1 and 2 twice each: 1 was sampled first
                        [-1, 3, -1, -1],  # no-answer responses never win, however many
                        [-1, -1, -1, -1],  # nothing to take
                        [4, 5, 5, -1]])   # 5 twice
    assert modal_answer(ids).tolist() == [1, 3, NO_ANSWER, 5]


def test_bypass_counts_differing_and_missing_answers():
    ids = torch.tensor([[1, 1, 2, -1], [3, 3, 3, 3], [1, 2, 3, 4]])
    out = bypass(ids, torch.tensor([1, 3, NO_ANSWER]))
    assert out[:2].tolist() == [0.5, 0.0]  # row 0: one other answer and one no-answer differ
    assert math.isnan(out[2])  # no reference answer: undefined, not "all differ"
    with pytest.raises(ValueError, match=r"reference must be \[N\]=3"):
        bypass(ids, torch.tensor([1, 3]))


def test_relative_positions_and_cuts():
    assert relative_positions(6) == pytest.approx([1 / 6, 7 / 30, 0.3, 11 / 30, 13 / 30, 0.5])
    assert relative_positions(1) == [1 / 6]
    assert cut_position(18, 1 / 6) == 3 and cut_position(18, 0.5) == 9
    assert cut_position(10, 0.25) == 3  # 2.5 rounds half up
    assert cut_position(10, 0.95) == 9  # a strict prefix: at most L - 1
    assert cut_position(1, 0.5) == 0  # a one-token response: the empty prefix
    assert cut_position(10, 0.05, lo=1) == 1
    # SKPO's interval [ceil(L/6), floor(L/2)]: L = 7 -> [2, 3]
    assert [skpo_cut(7, f) for f in relative_positions(3)] == [2, 2, 3]
    assert [skpo_cut(18, f) for f in relative_positions(6)] == [3, 4, 5, 7, 8, 9]
    with pytest.raises(ValueError, match="no prefix length"):
        skpo_cut(1, 0.5)


def test_implicit_advantage_normalises_across_the_runs_present():
    rates = torch.tensor([[[0.2], [0.5], [0.1]],
                          [[0.4], [0.5], [0.0]],
                          [[0.9], [0.0], [0.0]]], dtype=torch.float64)  # [R=3, P=3, M=1]
    present = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    adv = implicit_advantage(rates, present, eps=0.0)
    # problem 0: mean 0.5, deviations -0.3, -0.1, 0.4, Bessel std sqrt(0.26 / 2)
    std = math.sqrt(0.13)
    assert adv[:, 0, 0].tolist() == pytest.approx([-0.3 / std, -0.1 / std, 0.4 / std])
    assert adv[:2, 1, 0].tolist() == [0.0, 0.0] and math.isnan(adv[2, 1, 0])  # equal rates: 0; absent: NaN
    assert torch.isnan(adv[:, 2, 0]).all()  # one run only: nothing to compare with


def test_per_run_rates_and_the_summary_by_position():
    r = torch.tensor([[1.0, 0.5], [0.0, 0.5], [0.5, 1.0], [0.25, 0.25]])  # [X=4 kept responses, M=2]
    run = torch.tensor([0, 0, 1, 1])
    problem = torch.tensor([0, 0, 0, 1])
    rates, present = per_run_rates(r, run, problem, runs=2, problems=2)
    assert present.tolist() == [[True, False], [True, True]]
    assert rates[0, 0].tolist() == [0.5, 0.5] and rates[1, 0].tolist() == [0.5, 1.0]
    assert rates[1, 1].tolist() == [0.25, 0.25] and torch.isnan(rates[0, 1]).all()
    rows = implicit_summary(["a", "b"], rates, present, [0.25, 0.75])
    by = {(x.run, x.frac): x for x in rows}
    # problem 0 only (problem 1 has one run): position 0 equal rates -> 0; position 1: 0.5 vs 1.0 -> -+1/sqrt(2)
    assert by["a", 0.25].implicit_advantage == 0.0 and by["a", 0.25].problems == 1
    assert by["a", 0.75].implicit_advantage == pytest.approx(-1 / math.sqrt(2), rel=1e-5)
    assert by["b", 0.75].implicit_advantage == pytest.approx(1 / math.sqrt(2), rel=1e-5)
    assert by["b", 0.25].success_rate == 0.5 and by["b", 0.25].success_rate_all == pytest.approx(0.375)
    assert by["b", 0.25].problems_all == 2
    assert interior_positions(4) == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_nanmean():
    mean, n = nanmean(torch.tensor([[1.0, NAN], [3.0, NAN]]), dim=0)
    assert mean[0] == 2.0 and math.isnan(mean[1]) and n.tolist() == [2, 0]


def test_summarize_condition_by_position_and_overall():
    # S = 3 segments (positions 0, 0, 1), G = 2
    correct = torch.tensor([[True, True], [True, False], [False, False]])
    ids = torch.tensor([[0, 0], [0, 1], [2, -1]])
    lengths = torch.tensor([[10, 12], [8, 8], [4, 6]])
    reference = torch.tensor([0, 1, -1])  # the hard-prefix modes; segment 2 has none
    rows = summarize_condition("skip", correct, ids, lengths, reference, torch.tensor([0, 0, 1]),
                               torch.tensor([3, 3, 5]), [1 / 6, 1 / 2])
    p0, p1, total = rows
    assert (p0.position, p0.frac, p0.groups, p0.cut_tokens) == (0, 1 / 6, 2, 3.0)
    assert p0.accuracy == 0.75 and p0.zero_adv_rate == 0.5 and p0.distinct_answers == 1.5
    assert p0.response_tokens == 9.5 and p0.no_answer_rate == 0.0
    assert p0.bypass_rate == 0.25 and p0.bypass_groups == 2  # segment 0: 0 of 2 differ; segment 1: 1 of 2
    assert p1.accuracy == 0.0 and p1.zero_adv_rate == 1.0 and p1.no_answer_rate == 0.5
    assert math.isnan(p1.bypass_rate) and p1.bypass_groups == 0
    assert total.position is None and total.groups == 3 and total.accuracy == pytest.approx(0.5)
    assert total.zero_adv_rate == pytest.approx(2 / 3) and total.bypass_rate == 0.25


def test_sign_stats_hand_values():
    truth = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.5, -0.5, 0.0]])
    est = torch.tensor([[0.3, -0.1, 2.0], [1.0, -1.0, 0.0], [-0.5, 0.0, 0.5]])
    s = sign_stats(est, truth)
    assert (s.entries, s.groups, s.all_entries) == (4, 2, 9)  # the all-zero truth group has no sign to get
    assert s.sign_accuracy == 0.5  # group 0 both right; group 2 both wrong (an estimate of 0 is wrong)
    assert s.all_signs_right == 0.5
    assert s.mae == pytest.approx((0.7 + 0.9 + 2.0 + 1.0 + 1.0 + 0.0 + 1.0 + 0.5 + 0.5) / 9)
    empty = sign_stats(torch.zeros(1, 2), torch.zeros(1, 2))
    assert empty.entries == 0 and math.isnan(empty.sign_accuracy) and math.isnan(empty.all_signs_right)


def test_sign_stats_by_position_and_by_key():
    truth = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]], [[1.0, -1.0], [-1.0, 1.0]]])  # [N=2, G=2, M=2]
    est = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]], [[1.0, -1.0], [-1.0, 1.0]]])
    pos = sign_stats_by_position(est, truth)
    assert [p.sign_accuracy for p in pos] == [1.0, 0.5] and [p.entries for p in pos] == [4, 4]
    by = sign_stats_by_key(est, truth, torch.tensor([3, 5]))
    assert by[3].sign_accuracy == 0.5 and by[3].groups == 2  # key 3: group 0 at both positions
    assert by[5].sign_accuracy == 1.0 and by[5].all_signs_right == 1.0


def test_sign_model_summary_on_a_hand_group():
    # one problem, G = 3, M = 1 (dyadic rates: exact in floating point)
    truth = torch.tensor([[[0.75], [0.5], [0.25]]])  # normalised: (+1, 0, -1); the middle has no sign
    est = {"mc_k8": torch.tensor([[[0.375], [0.875], [0.25]]])}  # mean 0.5: signs (-, +, -)
    outcome = torch.tensor([[1.0, -1.0, -1.0]])
    by_pos, by_count, overall = sign_summary(truth, est, outcome, [0.5])
    rows = {r.estimate: r.stats for r in by_pos}
    assert rows["mc_k8"].entries == 2 and rows["mc_k8"].sign_accuracy == 0.5 and rows["mc_k8"].all_signs_right == 0.0
    # GRPO: outcomes (+1, -1, -1) -> (sqrt(4/3), -1/sqrt(3), -1/sqrt(3)): both signed entries right
    assert rows["grpo"].sign_accuracy == 1.0
    r3 = 1 / math.sqrt(3)
    assert rows["grpo"].mae == pytest.approx((math.sqrt(4 / 3) - 1 + r3 + 1 - r3) / 3, rel=1e-5)
    assert [r.correct for r in by_count if r.estimate == "grpo"] == [1]
    assert {r.estimate for r in overall} == {"mc_k8", "grpo"}


def test_position_fracs():
    assert len(position_fracs(0.05)) == 19 and position_fracs(0.05)[-1] == 0.95
    assert position_fracs(0.25) == [0.25, 0.5, 0.75] and position_fracs(0.3) == [0.3, 0.6, 0.9]
    with pytest.raises(ValueError, match="--position-step"):
        position_fracs(1.0)
