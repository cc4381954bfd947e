"""SPO (single-stream policy optimisation): one response per prompt, advantage A = R - V_prev(q)
against the KL-adaptive value tracker's pre-update value, then the tracker observes R
(``algo.advantage: spo`` batch-normalises A over the step's responses); one phase ``single``.
"""
from __future__ import annotations

from megatron_skpo.methods.base import METHODS, Credit, CreditInput, Method
from megatron_skpo.methods.common import CreditSettings, group_advantages
from megatron_skpo.methods.group import single_phase
from megatron_skpo.rollout.samplers.group import GroupSampler


def single_stream_credit(s: CreditSettings, inp: CreditInput) -> Credit:
    rows = inp.batch.rows("single")
    keys = [inp.batch.samples[r].prompt_key for r in rows]
    r = inp.rewards[rows]
    baseline = inp.tracker.value(keys)
    adv = group_advantages(s, inp.batch, rows, r, baseline=baseline)
    inp.tracker.observe(keys, r.clamp(-1, 1), inp.drift_of(keys))
    return Credit(adv, inp.rewards, set(), {"adv/single/baseline_mean": float(baseline.mean())})


@METHODS.register("single_stream")
def build_single_stream(cfg, tokenizer) -> Method:
    s = CreditSettings.from_config(cfg.algo)
    sampler = GroupSampler(1, cfg.rollout.max_response_tokens, cfg.rollout.timeout_s)  # G = 1 (config-checked)
    return Method(sampler, lambda inp: single_stream_credit(s, inp), single_phase(cfg.algo), drift_phase="single")
