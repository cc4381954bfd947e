"""Mixture-of-experts routing: per-expert token counts as metrics, and the aux-loss scale.

:class:`RouterStats` hooks every ``TopKRouter`` of this rank's model and adds up, per MoE layer,
how many tokens it routed to each expert (the router's ``routing_map``, before any dispatch, so
the count is the same at every expert-parallel size). Only forwards with gradients count: a
training step's forward (or, under full activation recompute, its one recomputation), never the
log-prob-only passes. :func:`router_metrics` reduces the counts over the job and returns them as
a flat ``dict[str, float]``.

:func:`aux_loss_scale` makes Megatron's load-balancing loss a token-weighted mean over the
micro-batches of a step, like our policy loss (see its docstring).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


class RouterStats:
    """Tokens routed to each expert of each MoE layer on this rank since the last :meth:`take`."""

    def __init__(self, gpt: torch.nn.Module):
        from megatron.core.transformer.moe.router import TopKRouter

        self.routers = [m for m in gpt.modules() if isinstance(m, TopKRouter)]
        self.num_layers = int(gpt.config.num_layers)
        self.num_experts = int(gpt.config.num_moe_experts or 0)
        self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        self.paused = False
        self.handles = [r.register_forward_hook(self._count) for r in self.routers]

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """No counting while active (filler micro-batches of padding tokens)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def _count(self, router, inputs, output) -> None:
        if torch.is_grad_enabled() and not self.paused:
            _, routing_map = output
            # layer_number is global and 1-based (the PP offset included)
            self.counts[router.layer_number - 1] += routing_map.detach().sum(0).to("cpu", torch.float64)

    def take(self) -> torch.Tensor:
        """This rank's ``[layers, experts]`` counts (zero rows for other stages' layers); resets."""
        counts, self.counts = self.counts, torch.zeros_like(self.counts)
        return counts

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _job_counts(local: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Sum over the data-parallel replicas (each routes its own tokens), over pipeline stages
    (each fills its own layers) and, with sequence parallelism, over the TP ranks' sequence
    slices; without it every TP rank routed the same tokens and holds the same counts."""
    total = local.clone()
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    if sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_tensor_model_parallel_group())
    return total


def router_metrics(stats: Optional[RouterStats], sequence_parallel: bool = False,
                   per_expert: bool = False) -> dict[str, float]:
    """Routing statistics since the last call, over the whole job (collective; every rank gets
    the same dict; ``{}`` for dense models, whose ``stats`` is None).

    Keys (``L`` MoE layers, ``E`` experts, ``n_le`` tokens layer l sent to expert e, ``mean_l``
    its mean over experts; a token counts once per expert it is routed to, i.e. top-k times):
      ``moe/tokens_routed``: sum of ``n_le`` (tokens x top-k x layers);
      ``moe/load_max_over_mean``, ``moe/load_min_over_mean``: ``max_e n_le / mean_l`` (1 = perfect
      balance, E = everything on one expert) and ``min_e n_le / mean_l``, averaged over layers;
      ``moe/load_max_over_mean_worst``: the largest ``max_e n_le / mean_l`` of any layer;
      ``moe/dead_experts``: (layer, expert) pairs that received no token;
      ``moe/layer_{l}/load_max_over_mean``, ``moe/layer_{l}/tokens_per_expert_{min,max}``;
      with ``per_expert``: ``moe/layer_{l}/expert_{e}/tokens`` = ``n_le`` (L x E values).
    """
    if stats is None:
        return {}
    counts = _job_counts(stats.take(), sequence_parallel)
    mean = counts.mean(1)
    if float(mean.min()) <= 0:  # no training forward since the last call
        return {}
    max_ratio, min_ratio = counts.max(1).values / mean, counts.min(1).values / mean
    out = {"moe/tokens_routed": float(counts.sum()), "moe/load_max_over_mean": float(max_ratio.mean()),
           "moe/load_min_over_mean": float(min_ratio.mean()),
           "moe/load_max_over_mean_worst": float(max_ratio.max()), "moe/dead_experts": float((counts == 0).sum())}
    width = len(str(counts.shape[0] - 1))
    for layer in range(counts.shape[0]):
        key = f"moe/layer_{layer:0{width}d}"
        out[f"{key}/load_max_over_mean"] = float(max_ratio[layer])
        out[f"{key}/tokens_per_expert_min"] = float(counts[layer].min())
        out[f"{key}/tokens_per_expert_max"] = float(counts[layer].max())
        if per_expert:
            out.update({f"{key}/expert_{e}/tokens": float(n) for e, n in enumerate(counts[layer])})
    return out


@contextlib.contextmanager
def aux_loss_scale(config, total_tokens: float) -> Iterator[None]:
    """While active, Megatron's load-balancing loss of a micro-batch of ``n`` tokens weighs
    ``n / total_tokens``: the step's loss is ``coeff * sum_mb (n_mb / N) * aux_mb`` (a token-weighted
    mean over micro-batches and data-parallel ranks, ``N`` = ``total_tokens``, all of them).

    Why: with ``calculate_per_token_loss`` megatron-core attaches ``aux_mb * n_mb`` to the
    activations and expects ``finalize_model_grads`` to divide every gradient by the step's token
    count. Our losses arrive already divided (:mod:`.train_step`) and finalize divides nothing, so
    the coefficient itself carries the ``1 / N``. The router reads ``config.moe_aux_loss_coeff``
    in each forward, which is when the loss (coefficient included) is fixed; the backward then
    uses those values, whatever the pipeline schedule's order.
    """
    base = config.moe_aux_loss_coeff
    if not config.num_moe_experts or not base or total_tokens <= 0:
        yield
        return
    config.moe_aux_loss_coeff = base / total_tokens
    try:
        yield
    finally:
        config.moe_aux_loss_coeff = base
