"""Critique-GRPO's sampler (Zhang et al. 2025, arXiv 2506.03106): initial responses, a critique of
each, a refinement of each written by the policy, one refinement kept per prompt.

Per prompt q (docs/algorithm.md §6):

1. G - 1 initial responses from q's prompt (rows ``single``);
2. each is graded by a reward pool (the grader is bound by the trainer, ``stages.bind_grader``, or
   in a rollout worker by the worker, with its own pool: ``worker._bind_local_grader``) and
   critiqued (:func:`critique_text`): ``simple`` says whether it is correct, ``simple_gt`` also
   gives the gold answer when it is not;
3. one refinement per initial response, sampled from the refinement prompt: the template's request
   (:data:`~megatron_skpo.data.prompts.CHAT_REFINE`, or ``algo.critique.template``) with the problem,
   the response and the critique, in the prompt's problem slot;
4. the refinements are graded and one is kept (:func:`choose_refinement`): a correct one if any,
   else any, drawn uniformly by the step's generator. The kept one becomes row ``refine`` of q's
   group, trained on q's own prompt (the critique is not in the trained context); the others are
   counted as sampled tokens (``rollout/tokens_refine_generated``) and dropped.

The kept refinement's sampler log-probs are those of the refinement prompt, not of q's prompt: the
refinement's loss does not use them (``shaped_prob``), and the trainer leaves ``refine`` rows out
of the sampler/trainer parity metrics.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import torch

from megatron_skpo.data.prompts import CHAT_REFINE, render_user_turn
from megatron_skpo.rollout.engine import Engine, GenRequest, generate
from megatron_skpo.rollout.samplers.base import PromptItem, Timer, check_unique_keys, phase_stats, rows_from
from megatron_skpo.rollout.types import RolloutBatch, Sample

_PLACEHOLDER = re.compile(r"\{(problem|response|critique)\}")


@dataclass(frozen=True)
class Grader:
    """What the sampler needs of the run's reward pool (bound by the trainer: ``stages.bind_grader``)."""

    verdicts: Callable[[Sequence[str], Sequence[Hashable]], list[bool]]  # (texts, prompt keys) -> correct?
    answer: Callable[[Hashable], str]  # prompt key -> its gold answer (``simple_gt``)

    @classmethod
    def over(cls, pool, refs) -> "Grader":
        """Grading through a reward pool, with ``refs[key]`` the prompt's reference (read at each call)."""
        return cls(lambda texts, keys: pool.evaluate(texts, [refs[k] for k in keys])[1], lambda key: refs[key].answer)


def critique_text(correct: bool, kind: str, answer: str = "") -> str:
    """The critique of one response: ``simple`` (correct / incorrect) or ``simple_gt`` (with the gold answer)."""
    if correct:
        return "The generated solution is correct."
    if kind == "simple_gt":
        return f"The generated solution is incorrect, the ground truth answer is: {answer}."
    if kind != "simple":
        raise ValueError(f"unknown critique kind {kind!r}; allowed: 'simple', 'simple_gt'")
    return "The generated solution is incorrect."


def fill_refine(template: str, problem: str, response: str, critique: str) -> str:
    """The refinement request, substituted in one pass (braces elsewhere stay literal)."""
    values = {"problem": problem, "response": response, "critique": critique}
    for key in values:
        if template.count("{" + key + "}") != 1:
            raise ValueError(f"refinement template must contain {{{key}}} exactly once: {template!r}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def choose_refinement(correct: Sequence[bool], generator: torch.Generator) -> int:
    """Index of the kept refinement: uniformly among the correct ones, or among all when none is."""
    pool = [i for i, c in enumerate(correct) if c] or list(range(len(correct)))
    return pool[int(torch.randint(len(pool), (1,), generator=generator))]


def refine_prompt_ids(item: PromptItem, content: str, tokenizer) -> list[int]:
    """``content`` rendered in q's problem slot (a chat user turn when q has no slot)."""
    if item.slot is None:
        text, special = render_user_turn(tokenizer, content)
    else:
        text, special = item.slot.text(content, tokenizer), item.slot.add_special_tokens
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


@dataclass
class CritiqueSampler:
    tokenizer: object
    group_size: int  # G: G - 1 initial responses and one refinement per prompt
    max_tokens: int
    critique: str = "simple"
    template: Optional[str] = None  # None: the prompt slot's own template's ``refine``
    timeout_s: float = 3600.0
    grader: Optional[Grader] = None  # bound by the trainer once its reward pool is open
    needs_grader = True

    def __post_init__(self):
        if self.group_size < 2 or self.max_tokens < 1:
            raise ValueError(f"CritiqueSampler: group_size ({self.group_size}) must be >= 2 (G - 1 responses and a "
                             f"refinement) and max_tokens ({self.max_tokens}) >= 1")

    def plan(self, prompts: Sequence[PromptItem], step: int, generator: torch.Generator) -> dict:
        return {}  # the kept refinement is drawn from ``generator`` while sampling

    def _template(self, item: PromptItem) -> str:
        if self.template is not None:
            return self.template
        return item.slot.template.refine if item.slot is not None and item.slot.messages is None else CHAT_REFINE

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def sample(self, engine: Engine, prompts: Sequence[PromptItem], step: int = 0,
               generator: Optional[torch.Generator] = None) -> RolloutBatch:
        if self.grader is None:
            raise RuntimeError("Critique-GRPO's sampler has no grader: the trainer (or the rollout worker) binds a "
                               "reward pool before the first rollout")
        check_unique_keys(prompts)
        generator = generator if generator is not None else torch.Generator().manual_seed(step)
        timer, n = Timer(), self.group_size - 1
        groups = generate(engine, [GenRequest(p.prompt_ids, n, self.max_tokens, tag=i) for i, p in enumerate(prompts)],
                          self.timeout_s)
        texts = [self._decode(g.token_ids) for gens in groups for g in gens]
        keys = [p.key for p, gens in zip(prompts, groups) for _ in gens]
        first = self.grader.verdicts(texts, keys)
        requests, k = [], 0
        for i, (p, gens) in enumerate(zip(prompts, groups)):
            for j in range(len(gens)):
                answer = self.grader.answer(p.key) if self.critique == "simple_gt" else ""
                content = fill_refine(self._template(p), p.problem, texts[k], critique_text(first[k], self.critique, answer))
                requests.append(GenRequest(refine_prompt_ids(p, content, self.tokenizer), 1, self.max_tokens, tag=(i, j)))
                k += 1
        refined = [gens[0] for gens in generate(engine, requests, self.timeout_s)]
        second = self.grader.verdicts([self._decode(g.token_ids) for g in refined], keys)
        samples: list[Sample] = []
        k, generated = 0, 0
        for i, (p, gens) in enumerate(zip(prompts, groups)):
            start = len(samples)
            samples += rows_from(gens, p.prompt_ids, p.key, i, "single")
            mine = refined[k: k + len(gens)]
            pick = choose_refinement(second[k: k + len(gens)], generator)
            g = mine[pick]
            samples.append(Sample(list(p.prompt_ids), g.token_ids, g.logprobs, g.finish_reason, p.key, i, "refine",
                                  parent=start + pick))
            generated += sum(len(r.token_ids) for r in mine)
            k += len(gens)
        batch = RolloutBatch(samples)
        batch.stats = phase_stats(batch, timer)
        discarded = generated - int(batch.stats.get("rollout/tokens_refine", 0.0))
        batch.stats["rollout/tokens_refine_generated"] = float(generated)
        batch.stats["rollout/generated_tokens"] += discarded
        batch.stats["rollout/count_refinements"] = float(len(second))
        batch.stats["rollout/count_refinements_correct"] = float(sum(second))
        return batch
