"""The synthetic sign-consistency diagnostic: hand values, limits, and the CLI."""
import json
import math

import pytest
import torch

from megatron_skpo.algo.advantages import AdvantageInput, AdvantageParams, compute_advantages
from megatron_skpo.analysis.sign_consistency import (
    balanced_group, diagnose, group_normalize, mc_advantages, sign_agreement)
from megatron_skpo.cli.analyze import main


def test_group_normalize_hand_values_and_constant_group():
    a = group_normalize(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64), eps=0.0)
    # mean 0, unbiased std sqrt(4/3): +-1 / sqrt(4/3) = +-sqrt(3)/2
    assert torch.allclose(a, torch.tensor([1, -1, -1, 1], dtype=torch.float64) * math.sqrt(3) / 2)
    assert torch.equal(group_normalize(torch.full((5,), 0.3)), torch.zeros(5))


def test_group_normalize_matches_the_grpo_estimator():
    r = torch.tensor([0.2, 0.9, 0.4, 0.4, 0.1, 0.7], dtype=torch.float64)
    inp = AdvantageInput(rewards=r, group_index=torch.tensor([0, 0, 0, 1, 1, 1]),
                         response_mask=torch.ones(6, 1))
    grpo = compute_advantages("grpo", inp, AdvantageParams(eps=1e-6))[:, 0]
    ours = torch.cat([group_normalize(r[:3]), group_normalize(r[3:])])
    assert torch.allclose(grpo, ours, atol=1e-12)


def test_sign_agreement_hand_values():
    true = torch.tensor([1.0, -1.0, 0.0])  # the zero entry has no sign and is excluded
    est = torch.tensor([[0.5, -0.2, 3.0], [0.5, 0.2, 0.0], [0.0, -1.0, 1.0]])
    per_entry, all_right = sign_agreement(est, true)
    assert per_entry.item() == pytest.approx(4 / 6)  # row0 2/2, row1 1/2, row2 1/2 (0 counts wrong)
    assert all_right.item() == pytest.approx(1 / 3)


def test_mc_estimates_are_binomial_means():
    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    adv = mc_advantages(p, k=16, trials=200, generator=gen)
    # p=0 always scores 0 and p=1 always 1: their normalised order is fixed in every trial
    assert bool((adv[:, 0] < adv[:, 1]).all())


def test_more_samples_give_more_consistent_signs():
    rows = diagnose(balanced_group(8, 0.1), [8, 256, 16384], trials=2000, seed=0)
    acc = [r.sign_accuracy for r in rows]
    assert acc[0] < acc[1] < acc[2] and acc[2] > 0.99
    assert rows[0].all_signs_right < 0.1 < rows[2].all_signs_right  # the paper's "all G right" curve
    assert rows[2].mc_mae < rows[0].mc_mae
    # GRPO's broadcast does not depend on K: one reference value
    assert len({r.grpo_mae for r in rows}) == 1


def test_diagnose_rejects_bad_input():
    with pytest.raises(ValueError, match="G >= 2"):
        diagnose(torch.tensor([0.5]), [8])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        diagnose(torch.tensor([0.5, 1.5]), [8])


def test_cli_table_and_json(capsys):
    assert main(["sign-consistency", "--balanced", "4", "--k", "8,64", "--trials", "200", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["k"] for r in lines] == [8, 64] and 0 <= lines[0]["sign_accuracy"] <= 1
    assert main(["sign-consistency", "--p", "0.2,0.8", "--k", "8", "--trials", "100"]) == 0
    assert "| 8 |" in capsys.readouterr().out
    assert main(["sign-consistency", "--p", "0.2,1.8", "--k", "8"]) == 2
