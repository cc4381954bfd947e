"""The policy loss of one PPO mini-batch as a Megatron ``loss_fn(logp, entropy, batch)``.

The packed micro-batch is cut back into rows ``[n, Lmax]`` and split by phase; the loss is
``policy_objective`` (one phase, ``algo.policy_loss``) or ``skpo_objective`` (upstream and
downstream rows of the same micro-batch, each phase with its own loss, aggregation and GLOBAL
token/sequence counts over the mini-batch on every data-parallel rank). The losses return this
rank's share of the global mean, so ``train_step`` runs with ``normalizer=1``.

Metrics travel as ``name|sum`` / ``name|n`` pairs (``LossMetrics``), which ``train_step`` sums
over micro-batches and ranks; :func:`reduce_loss_metrics` turns them into means once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_skpo.algo.losses import PolicyLossInput, PolicyLossParams, policy_objective
from megatron_skpo.algo.metrics import LossMetrics
from megatron_skpo.algo.tis import tis_weights
from megatron_skpo.model.packing import PackedBatch
from megatron_skpo.skpo.objective import PhaseCounts, PhaseExtras, skpo_objective
from megatron_skpo.trainer.rows import TrainRows, split_rows


@dataclass(frozen=True)
class LossSettings:
    """Plain values of the loss (the driver copies them from ``cfg.algo``)."""

    params: PolicyLossParams
    loss: str
    agg_mode: str
    norm_length: float
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    tis_cap: Optional[float] = None  # None = TIS off
    skpo: Optional[dict] = None  # skpo_objective keywords (losses, agg modes, weights) or None

    @classmethod
    def from_config(cls, algo) -> "LossSettings":
        c = algo.clip
        params = PolicyLossParams(c.eps_low, c.eps_high, c.dual_clip_c, algo.gspo_eps_low, algo.gspo_eps_high)
        k = algo.skpo
        skpo = dict(upstream_loss=k.upstream_loss, downstream_loss=k.downstream_loss,
                    upstream_agg_mode=k.upstream_agg_mode, downstream_agg_mode=k.downstream_agg_mode,
                    w_up=k.w_up, w_down=k.w_down) if algo.name == "skpo" else None
        return cls(params, algo.policy_loss, algo.loss_agg_mode, float(algo.norm_length), algo.kl.coef,
                   algo.kl.estimator, algo.entropy_coef, algo.tis.cap if algo.tis.enabled else None, skpo)

    @property
    def phases(self) -> tuple[str, ...]:
        return ("upstream", "downstream") if self.skpo else ("single",)


def global_counts(rows: TrainRows, phases: tuple[str, ...], group=None) -> dict[str, PhaseCounts]:
    """Per phase (loss tokens, sequences) of the mini-batch summed over the data-parallel group."""
    local = torch.tensor([c for p in phases for c in rows.counts(p)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(local, group=group)
    return {p: PhaseCounts(local[2 * i].item(), local[2 * i + 1].item()) for i, p in enumerate(phases)}


def _phase_input(cols: dict[str, Tensor], idx: list[int], s: LossSettings) -> tuple[PolicyLossInput, PhaseExtras]:
    pick = {k: v[idx] for k, v in cols.items()}
    inp = PolicyLossInput(pick["logp"], pick["old_logp"], pick["adv"], pick["mask"])
    tis = tis_weights(pick["old_logp"], pick["sampler_logp"], s.tis_cap, pick["mask"]) if s.tis_cap else None
    return inp, PhaseExtras(pick.get("ref_logp"), pick["entropy"], tis)


def make_loss_fn(rows: TrainRows, counts: dict[str, PhaseCounts], s: LossSettings):
    """``loss_fn(logp [S], entropy [S], batch) -> (local loss, {name|sum, name|n})``."""

    def loss_fn(logp: Tensor, entropy: Tensor, batch: PackedBatch):
        cols = {"logp": logp, "entropy": entropy, "mask": batch.loss_mask,
                **{k: v for k, v in batch.token_values.items() if k in ("adv", "old_logp", "sampler_logp", "ref_logp")}}
        cols = {k: split_rows(v, batch) for k, v in cols.items()}
        phase_of = [rows.phases[i] for i in batch.seq_index if i >= 0]
        inputs = {p: _phase_input(cols, [k for k, q in enumerate(phase_of) if q == p], s) for p in s.phases}
        common = dict(kl_estimator=s.kl_estimator, kl_coef=s.kl_coef, entropy_coef=s.entropy_coef,
                      norm_length=s.norm_length)
        if s.skpo:
            (up, up_x), (down, down_x) = inputs["upstream"], inputs["downstream"]
            loss, metrics = skpo_objective(up, down, s.params, counts["upstream"], counts["downstream"],
                                           up_extras=up_x, down_extras=down_x, **s.skpo, **common)
        else:
            (inp, x), c = inputs["single"], counts["single"]
            loss, metrics = policy_objective(inp, s.params, s.loss, s.agg_mode, c.tokens, c.seqs,
                                             ref_log_probs=x.ref_log_probs, entropy=x.entropy,
                                             tis_weights=x.tis_weights, **common)
        return loss, flatten(metrics)

    return loss_fn


def flatten(m: LossMetrics) -> dict[str, Tensor]:
    out = {}
    for name in m.names():
        out[f"{name}|sum"] = m.sums[name]
        out[f"{name}|n"] = m.counts[name] if name not in m.totals else torch.tensor(-1.0, dtype=torch.float64)
    return out


def reduce_loss_metrics(summed: dict[str, float], prefix: str = "loss/") -> dict[str, float]:
    """Means of the ``name|sum`` / ``name|n`` pairs (totals, whose n sums below 0, stay sums)."""
    out = {}
    for key, total in summed.items():
        if key.endswith("|sum"):
            name = key[:-4]
            n = summed[f"{name}|n"]
            if n < 0:
                out[prefix + name] = total
            elif n > 0:
                out[prefix + name] = total / n
    return out
