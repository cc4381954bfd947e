"""PRIME's implicit process reward model in the trainer: the second trainable model, its per-token
process rewards and its online cross-entropy update (the maths: ``methods/prime.py``, docs/algorithm.md §6).

The PRM is a Megatron GPTModel with its own optimizer and schedule, built from the policy's starting
weights and sharded like the policy (TP, PP, DP, the distributed optimizer), saved as the checkpoint
part ``prm`` (the same reshardable format as ``model``). The reference pi_ref is the run's frozen
reference model. Both score at temperature 1: log pi_prm - log pi_ref is the implicit PRM's
log-ratio, whatever the sampler's temperature (the policy's own log-probs stay at the sampler's).

One step, on the rows that pass the accuracy filter, mini-batch by mini-batch as the policy trains
(``train.mini_batch_prompts``; each data-parallel rank its prompts):

- ``ref_logp`` = log pi_ref of every response token (no gradient);
- the update: loss = mean over responses of BCE(sigmoid(beta sum_t (log pi_prm - log pi_ref)), y),
  y = the grader's verdict; one optimizer step per mini-batch (skipped, and counted, when the loss or
  a gradient is not finite);
- r_t = beta (log pi_prm(y_t) - log pi_ref(y_t)), from the PRM before its update (``update: after``:
  the update's own forward, PRIME's single forward) or after it (``before``: a second forward);
  ``none`` scores with the PRM as it is and never trains it.

Every rank ends with every kept row's r_t (gathered over the data-parallel group), so credit runs on
the whole batch on every rank as for the other methods.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron_skpo.algo.metrics import LossMetrics
from megatron_skpo.model.packing import PackedBatch, split_rows, unpack


def build_prm(cfg, hf_config: dict, weights: Optional[dict], total_updates: int):
    """The PRM: a trainable copy of the policy's starting point with its own optimizer (learning rate
    ``algo.prime.lr_scale`` x ``optim.lr``, the policy's schedule), scoring at temperature 1."""
    from megatron_skpo.trainer.build import build_policy_from

    o, scale = cfg.optim, cfg.algo.prime.lr_scale
    optim = replace(o, lr=min(o.lr * scale, 0.999), min_lr=min(o.min_lr * scale, o.lr * scale, 0.999))
    prm = build_policy_from(replace(cfg, optim=optim), hf_config, weights, total_updates)
    prm.temperature = 1.0
    return prm


def prm_loss_fn(beta: float, num_rows: float):
    """``loss_fn(logp, entropy, batch)`` of the PRM's cross-entropy: this rank's share of the mean
    over the mini-batch's ``num_rows`` responses (all ranks). Records the forward's detached log-probs
    as ``prm_logp`` (the pre-update scores of ``update: after``)."""

    def loss_fn(logp: Tensor, entropy: Tensor, batch: PackedBatch):
        batch.token_values.setdefault("prm_logp", logp.detach().float())
        mask = split_rows(batch.loss_mask, batch)
        ratio = split_rows(logp, batch) - split_rows(batch.token_values["ref_logp"], batch).to(logp.dtype)
        score = beta * (ratio * mask).sum(1)  # [n] the implicit outcome logit
        label = (split_rows(batch.token_values["label"], batch) * mask).amax(1).to(score.dtype)
        rows = mask.sum(1) > 0
        bce = F.binary_cross_entropy_with_logits(score[rows], label[rows], reduction="none")
        m = LossMetrics()
        m.add("loss", bce.detach().sum().double(), rows.sum())
        m.add("accuracy", ((score[rows] > 0) == (label[rows] > 0.5)).sum().double(), rows.sum())
        m.add("score", score[rows].detach().sum().double(), rows.sum())
        from megatron_skpo.trainer.objective import flatten

        return bce.sum() / max(num_rows, 1.0), flatten(m)

    return loss_fn


def label_values(batch, rows, correct: Tensor) -> list[Tensor]:
    """[L_i] per trained row: the verdict (1.0 / 0.0) on its response tokens, 0 on its prompt."""
    out = []
    for r in rows.rows:
        s = batch.samples[r]
        out.append(torch.cat([torch.zeros(len(s.prompt_ids)), torch.full((len(s.response_ids),), float(correct[r]))]))
    return out


def _train(run, micro: list[PackedBatch], num_rows: float) -> dict[str, float]:
    from megatron_skpo.model.train_step import (_is_filler, forward_backward, optimizer_step, reduce_metrics,
                                                share_from_last_stage, zero_grads)
    from megatron_skpo.trainer.objective import reduce_loss_metrics
    from megatron_skpo.trainer.stages import grads_finite

    zero_grads(run.prm)
    stores = forward_backward(run.prm, micro, prm_loss_fn(run.method.prm.beta, num_rows), normalizer=1.0)
    share_from_last_stage([mb for mb in micro if not _is_filler(mb)], "prm_logp")
    reduced = reduce_metrics(stores)
    ok = grads_finite(run.prm) and bool(torch.isfinite(torch.tensor(reduced.get("loss", 0.0))))
    out = reduce_loss_metrics(reduced, "prm/")
    if ok:
        step = optimizer_step(run.prm)
        out.update({"prm/grad_norm": step["grad_norm"], "prm/lr": step["lr"]})
    out["prm/skipped"] = float(not ok)
    return out


def _score(run, micro: list[PackedBatch]) -> None:
    from megatron_skpo.model.train_step import forward_logprobs

    for mb, (logp, _) in zip(micro, forward_logprobs(run.prm, micro) if micro else []):
        mb.token_values["prm_logp"] = logp


def process_rewards(run, batch, kept: list[int], correct: Tensor, num_prompts: int
                    ) -> tuple[dict[int, Tensor], dict[str, float]]:
    """r_t of every kept row (row -> [R_i] float32, on every rank) and the PRM's metrics."""
    from megatron_skpo.model.train_step import forward_logprobs, padding_micro_batches
    from megatron_skpo.trainer.objective import global_counts
    from megatron_skpo.trainer.rows import mini_batches, pack

    if not kept:
        return {}, {}
    s, par = run.method.prm, run.par
    dropped = {i for i, x in enumerate(batch.samples) if x.phase == "single"} - set(kept)
    zeros = {r: torch.zeros(len(batch.samples[r].response_ids)) for r in kept}
    reference = replace(run.reference, temperature=1.0)
    mine: dict[int, Tensor] = {}
    trained: list[dict[str, float]] = []
    minis = mini_batches(batch, zeros, dropped, num_prompts, run.cfg.train.mini_batch_prompts, par.dp_rank,
                         par.dp_size, overlong_filter=False)
    for rows in minis:
        rows.values["label"] = label_values(batch, rows, correct)
        micro = pack(rows, run.cfg.parallel.micro_batch_tokens)
        for mb, (logp, _) in zip(micro, forward_logprobs(reference, micro) if micro else []):
            mb.token_values["ref_logp"] = logp
        num_rows = global_counts(rows, run.method.phases, par.dp_group)["single"].seqs
        if s.update == "none":
            _score(run, micro)
        elif num_rows > 0:
            trained.append(_train(run, padding_micro_batches(micro), num_rows))
            if s.update == "before":
                _score(run, micro)
        for mb in micro:
            r = s.beta * (mb.token_values["prm_logp"] - mb.token_values["ref_logp"]) * mb.loss_mask
            for i, values in enumerate(unpack(r, mb, len(rows.rows))):
                if values is not None:
                    mine[rows.rows[i]] = values[rows.prompt_lens[i]:].float()
    means = {k: sum(m.get(k, 0.0) for m in trained) / len(trained) for k in {k for m in trained for k in m}}
    return _gather(mine, par.dp_group), means  # the metrics: means over the mini-batches that trained


def _gather(mine: dict[int, Tensor], group) -> dict[int, Tensor]:
    """Every data-parallel rank's rows, on every rank."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return mine
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, {k: v.tolist() for k, v in mine.items()}, group=group)
    return {k: torch.tensor(v, dtype=torch.float32) for p in parts for k, v in p.items()}
