"""SKPO sampler (docs/algorithm.md §2): upstream segments, median-NLL selection, skip prompt, downstream group.

Per prompt q with split position t_q:
  1. G upstream samples from q with ``max_tokens = t_q``; a sample that ended with EOS before
     reaching t_q is cut at half its length (``cut_upstream``), the others are the t_q-token prefix;
  2. the candidate whose mean NLL (sampler log-probs) is closest to the median is kept (the
     selector is configurable: min/max/random ablations);
  3. the skip prompt [s, q] is built (``build_downstream_prompt``: the segment and the problem in
     the user turn, or the segment as a hard prefix for the "w/o skip" ablation);
  4. G downstream responses are sampled from [s, q] with ``max_tokens`` = the rollout cap minus
     the steps the prompt's upstream group ran (its longest upstream sample, <= t_q; "remaining",
     ours: no prompt decodes longer than a GRPO group, and |s| + |o| <= cap) or the full cap.

Pipelined per prompt: every prompt's upstream group is submitted at once, and the moment one
prompt's G upstream samples are done its downstream group is submitted, while other prompts are
still decoding; no prompt waits for another, and continuous batching keeps the engine full. The
G downstream samples share the prompt [s, q], so with prefix caching it is prefilled once.

Departure from the paper: the paper keeps all G rows in one pass and rewrites their KV cache at
t_q (point every row at the kept segment's KV, recompute KV for [s, q]). vLLM's public API cannot
rewrite a running request's KV, so the cost-parity mechanism here is the per-prompt pipeline plus
prefix caching; the extra cost over GRPO is the prefill of [s, q] once per prompt and the tail
latency of the last downstream group.

Batch rows per prompt, in order: the kept segment (phase ``upstream``, prompt q, loss PPO-clip)
then its G downstream responses (phase ``downstream``, ``parent`` = the segment's row,
``segment_span`` = where the segment sits in the prompt, loss CISPO). Discarded candidates are
not rows; their lengths and scores are in :class:`SkpoRecord`. With ``own_completion`` (the
"w/o MC" ablation) the kept upstream sample is also continued to the end and added as an ``mc``
row (response = the whole upstream sample + its continuation, ``position`` = where the
continuation starts) whose grade is R_I(s).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import torch

from megatron_skpo.rollout.engine import Engine, GenRequest, Generation, run_until_done
from megatron_skpo.rollout.samplers.base import PromptItem, Timer, check_unique_keys, phase_stats, rows_from
from megatron_skpo.rollout.types import RolloutBatch, Sample, SkpoRecord
from megatron_skpo.skpo.prompt import DEFAULT_TEMPLATE, DownstreamPrompt, build_downstream_prompt
from megatron_skpo.skpo.segment import select_segments
from megatron_skpo.skpo.split import LengthTracker, cut_upstream, sample_split_positions


@dataclass
class Candidates:
    """The G upstream candidates of one prompt after the cut."""

    lengths: torch.Tensor  # [G] long, tokens generated
    eos_before: torch.Tensor  # [G] bool
    cut: torch.Tensor  # [G] long, segment length of each candidate
    nll: torch.Tensor  # [G] mean NLL of each cut segment
    selected: int


def choose_segment(gens: Sequence[Generation], t_q: int, selector: str = "median",
                   generator: Optional[torch.Generator] = None, step: int = 0) -> Candidates:
    """Cut the G upstream samples of one prompt (EOS before t_q: half length) and select one."""
    lengths = torch.tensor([len(g.token_ids) for g in gens], dtype=torch.long)
    eos_before = torch.tensor([g.finish_reason == "stop" for g in gens], dtype=torch.bool)
    cut = cut_upstream(lengths, eos_before, t_q)
    segments = [torch.tensor(g.logprobs[: int(c)], dtype=torch.float64) for g, c in zip(gens, cut)]
    choice = select_segments(segments, selector=selector, generator=generator, step=step)
    return Candidates(lengths, eos_before, cut, choice.nll, int(choice.index))


class SKPOSampler:
    """Pipelined two-phase SKPO rollouts; owns the per-prompt length tracker L_q."""

    def __init__(self, tokenizer, group_size: int, max_tokens: int, *, selector: str = "median",
                 skip_mode: str = "skip", template: str = DEFAULT_TEMPLATE, downstream_budget: str = "remaining",
                 split_min_frac: float = 1 / 6, split_max_frac: float = 1 / 2, split_mode: str = "uniform",
                 length_tracker: Optional[LengthTracker] = None, own_completion: bool = False, seed: int = 0,
                 timeout_s: float = 3600.0):
        if group_size < 2 or max_tokens < 2:
            raise ValueError(f"SKPOSampler: need group_size >= 2 and max_tokens >= 2, got {group_size}, {max_tokens}")
        if downstream_budget not in ("remaining", "full"):
            raise ValueError(f"rollout.downstream_budget: unknown value {downstream_budget!r}")
        self.tokenizer, self.group_size, self.max_tokens = tokenizer, group_size, max_tokens
        self.selector, self.skip_mode, self.template = selector, skip_mode, template
        self.downstream_budget, self.timeout_s, self.own_completion = downstream_budget, timeout_s, own_completion
        self.split = (split_min_frac, split_max_frac, split_mode)
        self.lengths = length_tracker if length_tracker is not None else LengthTracker()
        self.generator = torch.Generator().manual_seed(seed)

    def split_positions(self, prompts: Sequence[PromptItem], step: int, generator: torch.Generator) -> torch.Tensor:
        """[P] t_q ~ U[min_frac L_q, max_frac L_q], kept below the response cap."""
        lo, hi, mode = self.split
        t_q = sample_split_positions(self.lengths.lengths([p.key for p in prompts]), lo, hi, generator, mode, step)
        return t_q.clamp(max=self.max_tokens - 1)

    def plan(self, prompts: Sequence[PromptItem], step: int, generator: torch.Generator) -> dict:
        """The split positions from this process's length tracker (``sample`` takes them as ``t_q``)."""
        return {"t_q": self.split_positions(prompts, step, generator)}

    def sample(self, engine: Engine, prompts: Sequence[PromptItem], step: int = 0,
               generator: Optional[torch.Generator] = None, t_q: Optional[torch.Tensor] = None) -> RolloutBatch:
        """One step's rollouts; ``generator`` draws t_q and breaks random selections (default: the
        sampler's own, seeded once from ``seed``; the trainer passes one seeded per step)."""
        check_unique_keys(prompts)
        timer = Timer()
        gen = generator if generator is not None else self.generator
        t_q = self.split_positions(prompts, step, gen) if t_q is None else torch.as_tensor(t_q).long()
        if t_q.shape != (len(prompts),) or bool((t_q < 1).any()):
            raise ValueError(f"SKPOSampler.sample: t_q must be [P]={len(prompts)} positive ints, got {t_q.tolist()}")
        state = _Pipeline(self, engine, prompts, t_q.tolist(), step, gen)
        for i, p in enumerate(prompts):
            engine.submit(GenRequest(p.prompt_ids, self.group_size, int(t_q[i]), tag=("up", i)))
        run_until_done(engine, state.on_finished, self.timeout_s)
        batch = state.assemble()
        batch.stats = phase_stats(batch, timer)
        # discarded candidates were generated too: they count toward the sampling cost
        up = sum(sum(r.upstream_lengths) for r in batch.skpo)
        own = sum(len(x.response_ids) - x.position for x in batch.samples if x.phase == "mc")
        batch.stats["rollout/generated_tokens"] = up + own + batch.stats.get("rollout/tokens_downstream", 0.0)
        batch.stats["rollout/tokens_upstream_generated"] = float(up)
        return batch


class _Pipeline:
    """Per-step state: reacts to finished groups, submitting downstream work as it becomes possible."""

    def __init__(self, sampler: SKPOSampler, engine: Engine, prompts: Sequence[PromptItem], t_q: list[int], step: int,
                 generator: torch.Generator):
        self.s, self.engine, self.prompts, self.t_q, self.step = sampler, engine, prompts, t_q, step
        self.generator = generator
        self.upstream: dict[int, tuple[Candidates, Sample]] = {}
        self.down_prompts: dict[int, DownstreamPrompt] = {}
        self.downstream: dict[int, list[Generation]] = {}
        self.kept: dict[int, Generation] = {}  # the upstream sample the segment was cut from
        self.completions: dict[int, Generation] = {}  # "w/o MC": its continuation to the end

    def on_finished(self, tag: Hashable, gens: list[Generation]) -> None:
        phase, i = tag
        if phase == "up":
            self._start_downstream(i, gens)
        elif phase == "own":
            self.completions[i] = gens[0]
        else:
            self.downstream[i] = gens

    def _start_downstream(self, i: int, gens: list[Generation]) -> None:
        s, p = self.s, self.prompts[i]
        cand = choose_segment(gens, self.t_q[i], s.selector, self.generator, self.step)
        kept, cut = gens[cand.selected], int(cand.cut[cand.selected])
        seg_ids, seg_logprobs = kept.token_ids[:cut], kept.logprobs[:cut]
        seg_text = s.tokenizer.decode(seg_ids, skip_special_tokens=False)
        down = build_downstream_prompt(p.problem, seg_ids, seg_text, s.tokenizer, template=s.template,
                                       mode=s.skip_mode, slot=p.slot, prompt_ids=p.prompt_ids)
        self.upstream[i] = (cand, Sample(list(p.prompt_ids), list(seg_ids), list(seg_logprobs), "cut", p.key, i,
                                         "upstream"))
        self.down_prompts[i] = down
        # "remaining": the decode steps this prompt has left of a GRPO-sized budget (its upstream
        # group ran for max(lengths) steps), so no row outlasts a GRPO response and |s| + |o| <= cap
        spent = int(cand.lengths.max())
        budget = s.max_tokens - spent if s.downstream_budget == "remaining" else s.max_tokens
        self.engine.submit(GenRequest(down.token_ids, s.group_size, max(budget, 1), tag=("down", i)))
        if s.own_completion:  # "w/o MC" ablation: R_I(s) = reward of the kept sample's own completion
            self.kept[i] = kept
            if kept.finish_reason == "stop" or len(kept.token_ids) >= s.max_tokens:
                self.completions[i] = Generation([], [], kept.finish_reason)
            else:
                self.engine.submit(GenRequest(p.prompt_ids + kept.token_ids, 1, s.max_tokens - len(kept.token_ids),
                                              tag=("own", i)))

    def assemble(self) -> RolloutBatch:
        samples: list[Sample] = []
        records: list[SkpoRecord] = []
        for i, p in enumerate(self.prompts):
            cand, seg = self.upstream[i]
            up_row = len(samples)
            samples.append(seg)
            down_prompt = self.down_prompts[i]
            rows = rows_from(self.downstream[i], down_prompt.token_ids, p.key, i, "downstream", parent=up_row,
                             segment_span=tuple(down_prompt.segment_span))
            samples.extend(rows)
            records.append(SkpoRecord(p.key, self.t_q[i], cand.lengths.tolist(), cand.eos_before.tolist(),
                                      cand.cut.tolist(), cand.nll.tolist(), cand.selected, up_row,
                                      list(range(up_row + 1, up_row + 1 + len(rows)))))
            if i in self.kept:
                kept, cont = self.kept[i], self.completions[i]
                records[-1].completion_row = len(samples)
                samples.append(Sample(list(p.prompt_ids), kept.token_ids + cont.token_ids, kept.logprobs + cont.logprobs,
                                      cont.finish_reason, p.key, i, "mc", parent=up_row, position=len(kept.token_ids)))
        return RolloutBatch(samples, records)
