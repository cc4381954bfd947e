"""``skpo-bench rollout``: GRPO vs SKPO sampling cost on the same prompts, G and max lengths.

GRPO: G responses per prompt, all submitted at once. SKPO: the pipelined two-phase sampler
(``megatron_skpo.skpo.sampler``) with t_q ~ U[L/6, L/2] and L = ``--split-length``
(default: the response cap, i.e. responses that fill it). ``--two-batch`` also times the naive
schedule (every downstream group waits for all upstream groups) to show what the pipeline saves.
The prefix cache is reset before every run. Prints generated tokens (SKPO: all G upstream
candidates included), wall time and tokens/s of each, and ``time_ratio`` = SKPO / GRPO wall
time (the paper's cost-parity claim is ~1).
"""
from __future__ import annotations

import argparse
import statistics
from typing import Hashable

import torch

from megatron_skpo.config.rollout import RolloutConfig
from megatron_skpo.rollout.engine import GenRequest, VLLMEngine, generate
from megatron_skpo.rollout.samplers import GroupSampler, PromptItem
from megatron_skpo.data.prompts import render_user_turn
from megatron_skpo.skpo.sampler import SKPOSampler
from megatron_skpo.skpo.split import LengthTracker

PROBLEMS = [
    "Tom has 3 apples. He buys 5 more apples. How many apples does Tom have now?",
    "There are 9 birds on a tree. 4 birds fly away. How many birds are left on the tree?",
    "Sara has 3 bags with 4 marbles in each bag. How many marbles does Sara have?",
    "12 cookies are shared equally among 3 children. How many cookies does each child get?",
    "A farmer has 17 sheep. He buys 6 more and sells 4. How many sheep does he have?",
    "What is the sum of the first ten positive integers?",
    "A train travels 60 km per hour for 3 hours. How far does it travel?",
    "If 2x + 3 = 11, what is x?",
    "Lily reads 7 pages a day. How many pages does she read in two weeks?",
    "A rectangle is 8 cm long and 5 cm wide. What is its area?",
    "Sam had 20 dollars and spent 13. How many dollars are left?",
    "What is 15 percent of 80?",
]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per run")
    parser.add_argument("--group-size", type=int, default=8, help="G")
    parser.add_argument("--max-tokens", type=int, default=256, help="response cap (GRPO and SKPO rows alike)")
    parser.add_argument("--split-length", type=float, default=None, help="L for t_q ~ U[L/6, L/2] (default: --max-tokens)")
    parser.add_argument("--downstream-budget", choices=("remaining", "full"), default="remaining")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="alternating GRPO/SKPO runs; medians reported")
    parser.add_argument("--two-batch", action="store_true", help="also time the non-pipelined SKPO schedule")
    parser.add_argument("--seed", type=int, default=0)


class TwoBatch:
    """Engine wrapper that holds every downstream request until no upstream request is pending."""

    def __init__(self, engine):
        self.engine, self.eos_token_id, self.held = engine, engine.eos_token_id, []

    def submit(self, req: GenRequest) -> None:
        (self.held if req.tag[0] == "down" else []).append(req)
        if req.tag[0] != "down":
            self.engine.submit(req)

    def poll(self) -> list[tuple[Hashable, list]]:
        done = self.engine.poll()
        if not self.engine.has_pending() and self.held:
            for req in self.held:
                self.engine.submit(req)
            self.held = []
        return done

    def has_pending(self) -> bool:
        return self.engine.has_pending() or bool(self.held)


def _items(tokenizer, n: int) -> list[PromptItem]:
    items = []
    for i in range(n):
        problem = PROBLEMS[i % len(PROBLEMS)] + ("" if i < len(PROBLEMS) else f" (variant {i // len(PROBLEMS)})")
        text, special = render_user_turn(tokenizer, problem)
        items.append(PromptItem(f"p{i}", problem, tokenizer(text, add_special_tokens=special)["input_ids"]))
    return items


def _summary(runs: list) -> dict:
    """Medians over runs: wall time, generated tokens (discarded SKPO candidates included), tokens/s."""
    def med(key: str) -> float:
        return statistics.median(b.stats.get(key, 0.0) for b in runs)

    seconds, tokens = med("rollout/seconds"), med("rollout/generated_tokens")
    out = {"seconds": seconds, "cpu_seconds": med("rollout/cpu_seconds"), "engine_steps": med("engine_steps"),
           "tokens": tokens, "tokens_per_s": tokens / seconds,
           "batch_tokens": med("rollout/tokens")}  # tokens of the rows that enter the loss
    if any(b.skpo for b in runs):
        out.update(tokens_upstream=med("rollout/tokens_upstream_generated"),
                   tokens_downstream=med("rollout/tokens_downstream"))
    return out


def run(args: argparse.Namespace) -> dict:
    import os

    from transformers import AutoTokenizer

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # stdout carries the one JSON line

    cuda = torch.cuda.is_available()
    cfg = RolloutConfig(tp=args.tp, temperature=args.temperature, max_response_tokens=args.max_tokens,
                        max_prompt_tokens=512, dtype=args.dtype, seed=args.seed, enforce_eager=not cuda,
                        downstream_budget=args.downstream_budget, sleep_between_phases=False)
    engine = VLLMEngine.from_config(cfg, args.model, launcher="local")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    items = _items(tokenizer, args.prompts)
    generate(engine, [GenRequest(items[0].prompt_ids, 2, 8, None)])  # warm-up
    length = args.split_length or float(args.max_tokens)
    grpo = GroupSampler(args.group_size, args.max_tokens)
    skpo = SKPOSampler(tokenizer, args.group_size, args.max_tokens, downstream_budget=args.downstream_budget,
                       length_tracker=LengthTracker(length), seed=args.seed)
    runs: dict[str, list] = {"grpo": [], "skpo": [], "skpo_two_batch": []}
    t_q_all = []
    def timed(sampler, eng, **kw):
        engine.reset_prefix_cache()
        steps = engine.steps
        batch = sampler.sample(eng, items, **kw)
        batch.stats["engine_steps"] = float(engine.steps - steps)
        return batch

    for _ in range(args.repeats):
        runs["grpo"].append(timed(grpo, engine))
        t_q = skpo.split_positions(items, 0, skpo.generator)
        t_q_all += t_q.tolist()
        runs["skpo"].append(timed(skpo, engine, t_q=t_q))
        if args.two_batch:
            runs["skpo_two_batch"].append(timed(skpo, TwoBatch(engine), t_q=t_q))
    engine.close()
    out = {"model": args.model, "prompts": args.prompts, "group_size": args.group_size, "max_tokens": args.max_tokens,
           "temperature": args.temperature, "downstream_budget": args.downstream_budget, "repeats": args.repeats,
           "mean_t_q": sum(t_q_all) / len(t_q_all), "device": "cuda" if cuda else "cpu"}
    for name, batches in runs.items():
        if batches:
            out[name] = _summary(batches)
    out["time_ratio"] = out["skpo"]["seconds"] / out["grpo"]["seconds"]
    out["cpu_time_ratio"] = out["skpo"]["cpu_seconds"] / out["grpo"]["cpu_seconds"]
    out["steps_ratio"] = out["skpo"]["engine_steps"] / out["grpo"]["engine_steps"]
    out["token_ratio"] = out["skpo"]["tokens"] / out["grpo"]["tokens"]
    if args.two_batch:
        out["two_batch_time_ratio"] = out["skpo_two_batch"]["seconds"] / out["grpo"]["seconds"]
    return out
