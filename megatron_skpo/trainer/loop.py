"""The RL training loop: ``train(cfg)``, one screen, read top to bottom (stages in ``trainer.stages``).

Per step: rollouts (the method's sampler; requested through the rollout queue, ``trainer.feed``)
-> drift of revisited prompts -> rewards -> PRIME's process rewards (its PRM's update) -> advantages -> old/ref log-probs ->
``prompts_per_step / mini_batch_prompts`` PPO updates -> weight sync -> validation on ``data.eval``
every ``validation.interval`` steps -> the next steps' prompts requested -> metrics, and a
checkpoint every ``checkpoint.save_interval`` steps and at the end. With ``rollout.max_staleness``
k > 0 (disaggregated rollout workers), steps up to n + 1 + k are requested after step n, so the
workers generate them while the trainer trains (``trainer.rollout_queue``). The run ends after
``train.steps`` steps or once ``train.max_sampled_tokens`` tokens were sampled.

A run whose checkpoint directory has a ``latest`` resumes from it and repeats the uninterrupted
run's metrics exactly (timing metrics aside), because each step re-seeds its randomness from
(seed, step) and the weights are pushed into vLLM (prefix cache reset) before the first rollout.
"""
from __future__ import annotations

import sys
import time
from functools import partial

from megatron_skpo.config import Config
from megatron_skpo.trainer import feed, lifecycle, stages
from megatron_skpo.trainer.build import checkpoint_root
from megatron_skpo.trainer.checkpoint import CheckpointManager
from megatron_skpo.trainer.logging import MetricsLogger


def train(cfg: Config, export_hf: str | None = None, engine=None) -> int:
    """Train ``cfg``; returns 0, or 128 + the signal after SIGTERM/SIGINT (``trainer/lifecycle.py``).
    Launched by torchrun/srun, or as a single process. ``engine``: a started vLLM engine of the same
    model to reuse (tests); it is left open."""
    from megatron_skpo.trainer.export import export_hf as write_hf
    from megatron_skpo.trainer.run import build_run

    lifecycle.start_lifeline()  # our children die with us, also after kill -9
    run = build_run(cfg, engine)
    stop = lifecycle.Stop(cfg.checkpoint.signal_grace_s, cfg.checkpoint.enabled, run.rank)
    try:
        try:
            _loop(cfg, run, stop)
        except lifecycle.Stopped as e:
            if run.rank == 0:
                print(e, file=sys.stderr, flush=True)
            return e.code
        out = export_hf or cfg.checkpoint.export_hf
        if out:
            from checkpoint_convert.sizes import parse_size

            write_hf(run.policy, run.hf_config, cfg.model.hf_path, out, run.rank, run.par.tp_group, run.par.pp_group,
                     shard_bytes=parse_size(cfg.checkpoint.export_max_shard_size),
                     overwrite=cfg.checkpoint.export_overwrite)
    finally:
        stop.close()
        if run.workers is not None:
            run.workers.close()
        if engine is None and run.engine is not None:
            run.engine.close(release_distributed=False)
    return 0


def _loop(cfg: Config, run, stop: lifecycle.Stop) -> None:
    from megatron_skpo.rewards import RewardPool

    ckpt = CheckpointManager(checkpoint_root(cfg), cfg.checkpoint.save_interval, cfg.checkpoint.keep_last, run.rank)
    stop.last_saved = lambda: (lambda c: c.step if c else None)(ckpt.latest())
    resumed = ckpt.restore(run.parts()) if cfg.checkpoint.enabled and cfg.checkpoint.resume else None
    stages.announce(run, resumed)
    start = run.progress.step
    stages.sync_weights(run, start)  # the engine starts from hf_path; a resumed policy differs
    with RewardPool.from_config(cfg.reward) as run.pool, \
            MetricsLogger(cfg.logging, cfg.train.steps, resume_step=run.progress.metrics_step if resumed else -1,
                          rank=run.rank) as log:
        if start == 0 and (first := stages.start_metrics(run)):
            log.log(0, first)
        stages.bind_grader(run)  # Critique-GRPO's sampler grades its responses as it samples
        run.queue.settle(start)  # a resumed queue: in-flight steps are generated again
        feed.request(run, start)
        for step in range(start + 1, cfg.train.steps + 1):
            clock, t0 = stop.clock(), time.perf_counter()  # a signal: the step may be abandoned between stages
            with clock("generate"):  # requested earlier (rollout.max_staleness); colocated: generated now
                prompts, local, mine, queue_metrics = feed.take(run, step)  # local: this rank's share
            with clock("drift"):
                drift_of, drift_metrics = stages.drift(run, prompts)
            with clock("rewards"):
                rewards, counts = stages.grade(run, local)
                batch, rewards, correct, reward_metrics = stages.gather(run, local, rewards, mine, counts)
            with clock("prm"):  # PRIME's process reward model (no time for other methods)
                process, prm_metrics = stages.process_rewards(run, batch, correct, len(prompts))
            with clock("advantages"):
                cr = stages.credit(run, batch, rewards, drift_of, correct, process)
            with clock("logprobs"):
                minis = stages.prepare(run, batch, cr, len(prompts))
            with clock("train"):
                train_metrics = stages.update(run, minis, step)
                stages.remember(run, batch, minis)
            with clock("sync"):
                sync_metrics = stages.sync_weights(run, step)
            last = stages.finished(run, step, batch)
            with clock("validation"):
                val_metrics = stages.validation(run, step, last)
            if not last:
                feed.request(run, step)  # the steps the staleness bound now allows, with version ``step``
            metrics = {**reward_metrics, **drift_metrics, **prm_metrics, **stages.batch_metrics(batch, cr), **stages.parity(run, minis),
                       **train_metrics, **sync_metrics, **val_metrics, **run.guard.metrics(), **queue_metrics,
                       **clock.times, **stages.train_rate(minis, clock.times),
                       "time/step": time.perf_counter() - t0, "sampled_tokens": float(run.progress.sampled_tokens),
                       "perf/tokens_per_s": batch.generated_tokens() / max(time.perf_counter() - t0, 1e-9)}
            run.progress.step = run.progress.metrics_step = step
            log.log(step, metrics)
            save = partial(_save, run, ckpt, step)
            saved = cfg.checkpoint.enabled and (last or ckpt.should_save(step, cfg.train.steps))
            if saved:
                stop.timed(save)
            stop.end_of_step(step, saved, save)  # a signal: save if it fits the grace, stop
            if last:
                break


def _save(run, ckpt: CheckpointManager, step: int):
    feed.absorb(run)  # rollouts already sent are saved, not regenerated on resume
    return ckpt.save(step, run.parts())
