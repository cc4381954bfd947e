"""Data-parallel collectives that are identities on a one-rank group, left out.

megatron-core's DDP reduce-scatters (or all-reduces) its gradient buffer after every step's
backward, and the distributed optimizer all-gathers the parameter buffer after every update, also
when the data-parallel group has a single rank. There both are identities (the rank's shard is the
whole buffer), but gloo still copies the whole buffer: for a 135M model on a 2-core CPU, about
0.2 s for each of the two, every step. :func:`skip_single_rank_collectives` replaces them, per
bucket group whose collective group has one rank, by what remains of them: the gradient checks and
the gradient scaling megatron-core applies before its collective (1.0 with our per-token loss), so
the update is bit-for-bit the same. Groups of more than one rank, overlapped communication and
several distributed-optimizer instances are left to megatron-core.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch.distributed as dist


def skip_single_rank_collectives(model) -> int:
    """Patch the one-rank bucket groups of a megatron-core ``DistributedDataParallel``; returns how many."""
    cfg = model.ddp_config
    if cfg.overlap_grad_reduce or cfg.overlap_param_gather or cfg.num_distributed_optimizer_instances > 1:
        return 0
    patched = 0
    for group in list(model.bucket_groups) + list(model.expert_parallel_bucket_groups):
        pg = group.intra_distributed_optimizer_instance_group if cfg.use_distributed_optimizer \
            else group.data_parallel_group
        if dist.get_world_size(pg) != 1:
            continue
        group.start_grad_sync = partial(_local_grad_sync, group)
        if cfg.use_distributed_optimizer:
            group.start_param_sync = partial(_local_param_sync, group)
        patched += 1
    return patched


def _local_grad_sync(group, force_all_reduce: Optional[bool] = False) -> None:
    """``start_grad_sync`` without its collective (a sum or mean over one rank)."""
    cfg = group.ddp_config
    if cfg.check_for_nan_in_grad or cfg.check_for_large_grads:
        group.check_grads(check_for_nan_or_inf=cfg.check_for_nan_in_grad, check_for_large=cfg.check_for_large_grads)
    for bucket in group.buckets:
        if bucket.gradient_scaling_factor != 1.0:
            bucket.grad_data *= bucket.gradient_scaling_factor


def _local_param_sync(group, force_sync: bool = False) -> None:
    """``start_param_sync`` without its all-gather (the updated shard already is the whole buffer)."""
    group.param_gather_dispatched = True
