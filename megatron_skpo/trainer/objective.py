"""The policy loss of one PPO mini-batch as a Megatron ``loss_fn(logp, entropy, batch)``.

The packed micro-batch is cut back into rows ``[n, Lmax]`` and split by phase; the loss is
:func:`~megatron_skpo.algo.objective.phased_objective` over the method's phases (each with its own
loss, aggregation and GLOBAL token/sequence counts over the mini-batch on every data-parallel
rank). The losses return this rank's share of the global mean, so ``train_step`` runs with
``normalizer=1``.

Metrics travel as ``name|sum`` / ``name|n`` pairs (``LossMetrics``), which ``train_step`` sums
over micro-batches and ranks; :func:`reduce_loss_metrics` turns them into means once. Besides the
phases' own metrics, ``update_kl`` is the token-mean k3 KL(old || current) over every trained
token of the mini-batch, whatever the phases (the value tracker's batch-level drift).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_skpo.algo.aggregation import masked_sum
from megatron_skpo.algo.kl import kl_k3
from megatron_skpo.algo.losses import PolicyLossInput, PolicyLossParams
from megatron_skpo.algo.metrics import LossMetrics
from megatron_skpo.algo.objective import ObjectiveSettings, PhaseCounts, PhaseExtras, PhaseLoss, phased_objective
from megatron_skpo.algo.off_policy import OffPolicySettings, off_policy_inputs
from megatron_skpo.algo.tis import tis_weights
from megatron_skpo.model.packing import PackedBatch, split_rows
from megatron_skpo.settings import from_config
from megatron_skpo.trainer.rows import TrainRows


def objective_settings(algo) -> ObjectiveSettings:
    """What every phase shares, from ``cfg.algo``: every field at the key it declares."""
    params = from_config(PolicyLossParams, algo, "algo")
    return from_config(ObjectiveSettings, algo, "algo", params=params)


def global_counts(rows: TrainRows, phases: tuple[PhaseLoss, ...], group=None) -> dict[str, PhaseCounts]:
    """Per phase (loss tokens, sequences) of the mini-batch summed over the data-parallel group."""
    names = [p.phase for p in phases]
    local = torch.tensor([c for p in names for c in rows.counts(p)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(local, group=group)
    return {p: PhaseCounts(local[2 * i].item(), local[2 * i + 1].item()) for i, p in enumerate(names)}


def _phase_input(cols: dict[str, Tensor], idx: list[int], s: ObjectiveSettings) -> tuple[PolicyLossInput, PhaseExtras]:
    """One phase's loss input. Rows of an older policy version (``stale`` > 0, asynchronous rollouts)
    get ``algo.off_policy``'s correction; a mini-batch without them is the synchronous input exactly."""
    pick = {k: v[idx] for k, v in cols.items()}
    old, mask = pick["old_logp"], pick["mask"]
    stale = pick["stale"] > 0 if "stale" in pick else None
    if stale is not None and bool((stale & (mask > 0)).any()):
        old, weights = off_policy_inputs(s.off_policy, old, pick["sampler_logp"].to(old.dtype), stale,
                                         OffPolicySettings(s.off_policy_cap, s.tis_cap))
        if weights is not None:
            weights = torch.where(mask > 0, weights, torch.ones_like(weights))
    else:
        weights = tis_weights(old, pick["sampler_logp"], s.tis_cap, mask) if s.tis_cap else None
    inp = PolicyLossInput(pick["logp"], old, pick["adv"], mask)
    return inp, PhaseExtras(pick.get("ref_logp"), pick["entropy"], weights)


def make_loss_fn(rows: TrainRows, counts: dict[str, PhaseCounts], phases: tuple[PhaseLoss, ...],
                 s: ObjectiveSettings):
    """``loss_fn(logp [S], entropy [S], batch) -> (local loss, {name|sum, name|n})``."""

    def loss_fn(logp: Tensor, entropy: Tensor, batch: PackedBatch):
        if "old_logp" not in batch.token_values:  # on-policy: this forward's own log-probs are pi_old
            batch.token_values["old_logp"] = logp.detach().float()
        cols = {"logp": logp, "entropy": entropy, "mask": batch.loss_mask,
                **{k: v for k, v in batch.token_values.items()
                   if k in ("adv", "old_logp", "sampler_logp", "ref_logp", "stale")}}
        cols = {k: split_rows(v, batch) for k, v in cols.items()}
        phase_of = [rows.phases[i] for i in batch.seq_index if i >= 0]
        inputs = {p.phase: _phase_input(cols, [k for k, q in enumerate(phase_of) if q == p.phase], s) for p in phases}
        loss, metrics = phased_objective(phases, {k: v[0] for k, v in inputs.items()}, counts, s,
                                         {k: v[1] for k, v in inputs.items()})
        mask = cols["mask"] > 0
        kl = kl_k3(cols["old_logp"].double(), cols["logp"].detach().double())  # KL(old || current), k3
        metrics.add("update_kl", masked_sum(kl, mask), mask.sum())
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
