"""Validation inside the loop: avg@k and pass@k of the current policy on ``data.eval``.

The colocated engine or the rollout workers hold the current weights (validation runs right after a
weight sync, or before the first step; a disaggregated run's workers take it after the requests
sent before it), samples ``validation.k`` responses per held-out problem at
``validation.temperature``, and the reward pool grades them. Sampling noise is re-seeded from
(train.seed, step), so a resumed run repeats a validation exactly. Metrics: ``val/avg@k`` (mean
correctness over all samples, an unbiased estimate of pass@1), ``val/pass@k`` (every problem with at
least one correct sample counts), ``val/reward``, ``val/length``, ``val/no_answer_rate``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from megatron_skpo.config import Config
from megatron_skpo.eval.metrics import pass_at_k
from megatron_skpo.rollout.engine import GenRequest, generate
from megatron_skpo.trainer import build
from megatron_skpo.trainer.build import Problems, load_problems


def load_validation(cfg: Config, tokenizer) -> Optional[Problems]:
    """The held-out problems of ``data.eval`` rendered like the training prompts, or None."""
    if cfg.data.eval is None:
        return None
    return load_problems(cfg, tokenizer, cfg.data.eval, "data.eval")


def validate(run, problems: Problems, seed: int, step: int) -> dict[str, float]:
    """``val/*`` metrics of the engine's current weights on ``problems``, sharded over the engines like
    the rollouts (problem ``i`` on engine ``i mod engines``); rank 0 also writes every problem's
    correct samples to ``<logging.dir>/validation/step_<step>.json`` (paired comparisons between
    steps, e.g. the standard error of an improvement)."""
    v, par = run.cfg.validation, run.par
    shards = par.gather_shares(_sample_and_grade(run, problems, par.share(len(problems.items)), seed))
    per_problem = [c for _, c, _ in sorted(x for shard in shards for x in shard["problems"])]
    lengths = [n for shard in shards for n in shard["lengths"]]
    rewards = [r for shard in shards for r in shard["rewards"]]
    no_answer = sum(shard["no_answer"] for shard in shards)
    if run.rank == 0:
        out = Path(run.cfg.logging.dir) / "validation"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"step_{step:06d}.json").write_text(json.dumps({"step": step, "k": v.k, "correct": per_problem}) + "\n")
    flat = [c for per in per_problem for c in per]
    return {f"val/avg@{v.k}": sum(flat) / len(flat),
            f"val/pass@{v.k}": sum(pass_at_k(v.k, sum(c), v.k) for c in per_problem) / len(per_problem),
            "val/reward": sum(rewards) / len(rewards), "val/length": sum(lengths) / len(lengths),
            "val/no_answer_rate": no_answer / len(flat), "val/problems": float(len(per_problem))}


def _generate(run, problems: Problems, mine: list[int], seed: int) -> list:
    """``validation.k`` samples of each of ``mine`` with the current weights: on this rank's engine, or
    (disaggregated) on the rollout workers, problem ``mine[i]`` on worker i mod workers, sent to every rank."""
    v, engine = run.cfg.validation, run.engine
    cap = v.max_tokens or run.cfg.rollout.max_response_tokens
    if engine is None:
        groups = None
        if run.workers is not None:
            w = len(run.workers.channels)
            shares = [[problems.items[i].prompt_ids for k, i in enumerate(mine) if k % w == j] for j in range(w)]
            settings = build.sampling_settings(run.cfg, build.template_stop(run.cfg))
            per = run.workers.validate(shares, v.k, cap, dataclasses.replace(settings, temperature=v.temperature),
                                       seed)
            groups = [per[k % w][k // w] for k in range(len(mine))]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            box = [groups]
            torch.distributed.broadcast_object_list(box, src=0)
            groups = box[0]
        return groups
    saved = engine.settings
    engine.settings = dataclasses.replace(saved, temperature=v.temperature)
    torch.manual_seed(seed)  # vLLM's sampling noise on CPU
    try:
        return generate(engine, [GenRequest(problems.items[i].prompt_ids, v.k, cap, tag=i) for i in mine],
                        run.cfg.rollout.timeout_s) if mine else []
    finally:
        engine.settings = saved


def _sample_and_grade(run, problems: Problems, mine: list[int], seed: int) -> dict:
    """This rank's problems: ``[(index, [correct per sample], k)]``, lengths, rewards, no-answer count."""
    v = run.cfg.validation
    groups = _generate(run, problems, mine, seed)
    texts = [run.tokenizer.decode(g.token_ids, skip_special_tokens=True) for gens in groups for g in gens]
    refs = [problems.refs[i] for i, gens in zip(mine, groups) for _ in gens]
    rewards, correct, stats = run.pool.evaluate(texts, refs) if texts else ([], [], None)
    return {"problems": [(i, correct[k * v.k:(k + 1) * v.k], v.k) for k, i in enumerate(mine)],
            "lengths": [len(g.token_ids) for gens in groups for g in gens], "rewards": list(rewards),
            "no_answer": stats.no_answer if stats is not None else 0}
