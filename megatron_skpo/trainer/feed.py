"""Feeding the loop rollouts through the :class:`~megatron_skpo.trainer.rollout_queue.RolloutQueue`, for
both placements.

- colocated (``max_staleness`` 0): ``request`` only draws the next step's prompts; ``take`` generates
  them on this rank's engine at the start of the step (``stages.rollout``), as the loop always did.
- disaggregated: rank 0 sends each requested step to the rollout workers at once (prompt i to worker
  i mod workers, with the sampler's plan -- SKPO's split positions -- drawn here from the trackers
  as they are now) and ``take`` waits for them; every trainer rank gets the whole step's batch (the
  rollout workers are one "engine" for the trainer's sharding: ``Parallel.engines == 1``).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megatron_skpo.rollout.samplers import PromptItem
from megatron_skpo.rollout.types import RolloutBatch, merge_shards
from megatron_skpo.trainer import stages
from megatron_skpo.trainer.rollout_queue import Entry
from megatron_skpo.trainer.run import Run


def request(run: Run, trained_through: int) -> None:
    """Draw and request every step the staleness bound allows after ``trained_through`` steps (the
    weights last pushed are that version)."""
    q = run.queue
    for step in q.due(trained_through, run.cfg.train.steps):
        prompts = stages.sample_prompts(run, step)
        q.add(step, trained_through, [p.key for p in prompts])
    if run.workers is not None:
        for e in q.pending():
            _submit(run, e)


def _shares(n: int, workers: int) -> list[list[int]]:
    return [[i for i in range(n) if i % workers == j] for j in range(workers)]


def _submit(run: Run, e: Entry) -> None:
    """Send entry ``e``'s prompts to the workers, seeded as a colocated engine of the same share is."""
    seed = run.cfg.train.seed
    prompts = [run.problems.items[k] for k in e.keys]
    for j, idx in enumerate(_shares(len(prompts), len(run.workers.channels))):
        share = [prompts[i] for i in idx]
        gen = torch.Generator().manual_seed(stages.stream_seed(seed, e.step, 2))
        plan = run.method.sampler.plan(share, e.step, gen) if share else {}
        # a sampler that grades while it samples (Critique-GRPO's) grades in the worker: it gets the references
        refs = {p.key: run.problems.refs[p.key] for p in share} if stages.grades_while_sampling(run) else None
        run.workers.generate(j, step=e.step, version=e.version, prompts=share, plan=plan, refs=refs,
                             generator_state=gen.get_state(), torch_seed=stages.stream_seed(seed, e.step, 0))
    e.submitted = True


def _collect(run: Run, e: Entry) -> tuple[RolloutBatch, dict[str, float]]:
    """Entry ``e``'s whole batch from the workers (rank 0), and the workers' timing."""
    if e.batch is not None:  # filed before a checkpoint, or restored from one
        return e.batch, e.timing
    if not e.submitted:
        _submit(run, e)
    n = len(e.keys)
    shares = _shares(n, len(run.workers.channels))
    msgs = [run.workers.generated(j, e.step, e.version) if idx else None for j, idx in enumerate(shares)]
    return _merge(msgs, shares), {"time/rollout_idle": max(m["idle_s"] for m in msgs if m),
                                  "time/rollout_weight_load": run.workers.load_seconds}


def _merge(msgs: list, shares: list[list[int]]) -> RolloutBatch:
    parts = [(m["batch"], idx) for m, idx in zip(msgs, shares) if m]
    batch = merge_shards(parts)
    tokens = sum(b.stats.get("rollout/tokens", 0.0) for b, _ in parts)
    seconds = max(b.stats.get("rollout/seconds", 0.0) for b, _ in parts)
    batch.stats.update({"rollout/seconds": seconds, "rollout/tokens": tokens,
                        "rollout/generated_tokens": batch.stats["rollout/generated_tokens_all"],
                        "rollout/tokens_per_s": batch.stats["rollout/generated_tokens_all"] / max(seconds, 1e-9)})
    return batch


def absorb(run: Run) -> None:
    """Rank 0: file the rollouts the workers already sent under their entries (before a checkpoint,
    so that only what is really still being generated is regenerated on resume)."""
    if run.workers is None:
        return
    for j in range(len(run.workers.channels)):
        run.workers.finished(j)
    for e in run.queue.entries.values():
        if e.batch is None and e.submitted and all(
                any(m["step"] == e.step and m["version"] == e.version for m in run.workers.finished(j))
                for j, idx in enumerate(_shares(len(e.keys), len(run.workers.channels))) if idx):
            e.batch, e.timing = _collect(run, e)


def take(run: Run, step: int) -> tuple[list[PromptItem], RolloutBatch, list[int], dict[str, float]]:
    """``step``'s prompts, this rank's share of its rollouts and their step indices (as
    ``stages.rollout``), and the queue's metrics: staleness, drops, how long the trainer waited."""
    q, version = run.queue, run.progress.step
    if step not in q.entries:
        request(run, step - 1)
    e, dropped = q.pop(step, version)
    timing: dict[str, float] = {}
    prompts = [run.problems.items[k] for k in e.keys]
    if run.cfg.rollout.placement == "colocated":
        local, mine = stages.rollout(run, prompts, step)
        for s in local.samples:
            s.version = e.version
    else:
        t0 = time.perf_counter()
        batch, timing = _collect(run, e) if run.rank == 0 else (None, {})
        timing["time/trainer_idle"] = time.perf_counter() - t0  # waiting for rollouts, nothing to train
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [(batch, timing)]
            dist.broadcast_object_list(box, src=0)
            batch, timing = box[0]
        local, mine = batch, list(range(len(e.keys)))
    lag = torch.tensor([float(version - s.version) for s in local.samples] or [0.0], dtype=torch.float64)
    return prompts, local, mine, {"async/staleness_mean": float(lag.mean()), "async/staleness_max": float(lag.max()),
                         "async/dropped_samples": float(dropped), **timing, **q.metrics()}
