"""Validation inside the loop: avg@k and pass@k of the current policy on ``data.eval``.

The colocated engine holds the current weights (validation runs right after a weight sync, or
before the first step), samples ``validation.k`` responses per held-out problem at
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
from megatron_skpo.trainer.build import Problems, load_problems


def load_validation(cfg: Config, tokenizer) -> Optional[Problems]:
    """The held-out problems of ``data.eval`` rendered like the training prompts, or None."""
    if cfg.data.eval is None:
        return None
    return load_problems(cfg, tokenizer, cfg.data.eval, "data.eval")


def validate(run, problems: Problems, seed: int, step: int) -> dict[str, float]:
    """``val/*`` metrics of the engine's current weights on ``problems``; rank 0 also writes every
    problem's correct samples to ``<logging.dir>/validation/step_<step>.json`` (paired comparisons
    between steps, e.g. the standard error of an improvement)."""
    v = run.cfg.validation
    engine = run.engine
    saved = engine.settings
    engine.settings = dataclasses.replace(saved, temperature=v.temperature)
    torch.manual_seed(seed)  # vLLM's sampling noise on CPU
    try:
        cap = v.max_tokens or run.cfg.rollout.max_response_tokens
        groups = generate(engine, [GenRequest(p.prompt_ids, v.k, cap, tag=i) for i, p in enumerate(problems.items)],
                          run.cfg.rollout.timeout_s)
    finally:
        engine.settings = saved
    texts = [run.tokenizer.decode(g.token_ids, skip_special_tokens=True) for gens in groups for g in gens]
    golds = [problems.answers[i] for i, gens in enumerate(groups) for _ in gens]
    rewards, stats = run.pool.score(texts, golds)
    correct = [r == run.cfg.reward.correct for r in rewards]
    per_problem = [correct[i * v.k:(i + 1) * v.k] for i in range(len(groups))]
    lengths = [len(g.token_ids) for gens in groups for g in gens]
    if run.rank == 0:
        out = Path(run.cfg.logging.dir) / "validation"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"step_{step:06d}.json").write_text(json.dumps({"step": step, "k": v.k, "correct": [
            [bool(c) for c in per] for per in per_problem]}) + "\n")
    return {f"val/avg@{v.k}": sum(correct) / len(correct),
            f"val/pass@{v.k}": sum(pass_at_k(v.k, sum(c), v.k) for c in per_problem) / len(per_problem),
            "val/reward": sum(rewards) / len(rewards), "val/length": sum(lengths) / len(lengths),
            "val/no_answer_rate": stats.no_answer / max(stats.n, 1), "val/problems": float(len(per_problem))}
