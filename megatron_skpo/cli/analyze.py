"""``skpo-analyze``: the paper's analyses as tools (docs/algorithm.md §7).

    skpo-analyze sign-consistency --p 0.4,0.45,0.5,0.55,0.6,0.65,0.7,0.35 --k 8,64,256,4096
    skpo-analyze sign-consistency --balanced 8 --spread 0.1 --json
    skpo-analyze sign-consistency --model HF_DIR --dataset mawps_easy --limit 4 --prompt-template fewshot_plain \\
        --no-chat-template --max-tokens 64 --k 8 --k-truth 64 --out runs/sign
    skpo-analyze shortcut --model HF_DIR --dataset mawps_easy --limit 40 --prompt-template fewshot_plain \\
        --no-chat-template --group-size 8 --temperature 0.6 --max-tokens 64 --positions 6 --out runs/shortcut
    skpo-analyze bypass-curve --run runs/skpo_seed0 --limit 40 --out runs/bypass_curve
    skpo-analyze implicit-advantage --runs skpo=runs/skpo/hf grpo=runs/grpo/hf --evaluator HF_DIR \\
        --dataset mawps_easy --limit 40 --prompt-template fewshot_plain --no-chat-template --out runs/implicit

The model-based analyses take the problem and decoding flags of ``skpo-eval`` and write JSON, a
PNG and a Markdown table under ``--out``; the table is also printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

from megatron_skpo.analysis.sign_consistency import balanced_group, diagnose

SYNTHETIC_K = [8, 16, 32, 64, 256, 1024, 4096]


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _skip_text(text: str) -> str:
    """A skip text from the command line: ``\\n`` stands for a newline."""
    return text.replace("\\n", "\n")


def _add_task_args(p: argparse.ArgumentParser) -> None:
    """Problems and prompts, as ``skpo-eval`` names them."""
    p.add_argument("--dataset", default="mawps_easy", help="built-in recipe (mawps_easy, gsm8k, ...) or a "
                   "JSONL/Parquet file (--prompt-field, --answer-field)")
    p.add_argument("--offset", type=int, default=0, help="skip the first N problems")
    p.add_argument("--limit", type=int, default=None, help="first N problems (after --offset)")
    p.add_argument("--prompt-field", default="prompt", help="prompt field of a dataset file (dotted path)")
    p.add_argument("--answer-field", default="answer", help="gold-answer field of a dataset file (dotted path)")
    p.add_argument("--prompt-template", default="qwen_math", help="qwen_math, fewshot_plain, raw or a {problem} format")
    p.add_argument("--no-chat-template", action="store_true", help="do not wrap prompts in the chat template")
    p.add_argument("--extractors", default=None, help="answer extraction order (default: the template's)")


def _add_decoding_args(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--max-tokens", type=int, default=1024, help="response token cap")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="engine seed")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--workers", type=int, default=2, help="grading processes")
    p.add_argument("--grading-timeout", type=float, default=5.0, help="seconds per graded response")
    p.add_argument("--out", default=out, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skpo-analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    sc = sub.add_parser("sign-consistency", formatter_class=fmt,
                        help="MC sign-consistency diagnostic: synthetic, or on a real model with --model")
    group = sc.add_mutually_exclusive_group()
    group.add_argument("--p", type=_floats, help="synthetic: success probabilities of the G responses")
    group.add_argument("--balanced", type=int, default=None, help="synthetic: G of a balanced group around 0.5 "
                       "(default 8)")
    sc.add_argument("--spread", type=float, default=0.1, help="synthetic: half-width of the balanced group")
    sc.add_argument("--k", type=_ints, default=None, help=f"MC sample sizes (synthetic default {SYNTHETIC_K}; "
                    "--model default 8)")
    sc.add_argument("--trials", type=int, default=None, help="synthetic: simulated groups per K (default 4000)")
    sc.add_argument("--json", action="store_true", help="synthetic: one JSON line per K instead of a table")
    sc.add_argument("--model", default=None, help="run on this model (HF directory, .gguf or Megatron checkpoint)")
    sc.add_argument("--group-size", type=int, default=8, help="--model: G responses per problem")
    sc.add_argument("--k-truth", type=int, default=64, help="--model: continuations of the 'true' value per prefix")
    sc.add_argument("--position-step", type=float, default=0.05, help="--model: prefixes every this fraction of "
                    "each response's length (step, 2 step, ... < 1)")
    _add_task_args(sc)
    _add_decoding_args(sc, "analyze_sign_consistency")

    sh = sub.add_parser("shortcut", formatter_class=fmt,
                        help="continuations under q, the hard prefix and the skip prompt [s, q]")
    sh.add_argument("--model", required=True, help="HF directory, .gguf or Megatron checkpoint")
    sh.add_argument("--group-size", type=int, default=8, help="G continuations per segment and condition")
    sh.add_argument("--positions", type=int, default=6, help="relative cut positions, evenly spaced in [1/6, 1/2]")
    sh.add_argument("--base-responses", type=int, default=1, help="responses sampled from q per problem, each cut")
    sh.add_argument("--skip-template", action="append", type=_skip_text, default=None,
                    help="a skip text with {segment} and {problem} (\\n = newline); repeat to compare several "
                         "(default: the prompt template's own, data/prompts.py)")
    sh.add_argument("--downstream-budget", choices=("remaining", "full"), default="remaining",
                    help="new tokens after a segment: max-tokens minus its length, or max-tokens")
    _add_task_args(sh)
    _add_decoding_args(sh, "analyze_shortcut")

    bc = sub.add_parser("bypass-curve", formatter_class=fmt,
                        help="the shortcut analysis at step 0 and every checkpoint of an SKPO run")
    bc.add_argument("--run", required=True, type=Path, help="the run's directory (its logging.dir, with config.yaml)")
    bc.add_argument("--base", default=None, help="step 0's model (default: the run's model.hf_path)")
    bc.add_argument("--steps", type=_ints, default=None, help="only these steps (0 = the base model)")
    bc.add_argument("--group-size", type=int, default=8, help="G continuations per segment and condition")
    bc.add_argument("--positions", type=int, default=3, help="relative cut positions, evenly spaced in [1/6, 1/2]")
    bc.add_argument("--offset", type=int, default=0, help="skip the first N of the run's held-out problems")
    bc.add_argument("--limit", type=int, default=40, help="held-out problems measured at every step")
    bc.add_argument("--seed", type=int, default=0, help="engine seed (the same at every step)")
    bc.add_argument("--workers", type=int, default=2, help="grading processes")
    bc.add_argument("--grading-timeout", type=float, default=5.0, help="seconds per graded response")
    bc.add_argument("--out", default="runs/analyze_bypass_curve", help="output directory (a rerun resumes in it)")
    bc.add_argument("--quiet", action="store_true", help="no progress bars")

    ia = sub.add_parser("implicit-advantage", formatter_class=fmt,
                        help="prefixes of several runs' correct responses, scored by one evaluator model")
    ia.add_argument("--runs", nargs="+", required=True, type=_run, metavar="NAME=MODEL",
                    help="trained runs to compare (exported HF directories, .gguf or Megatron checkpoints)")
    ia.add_argument("--evaluator", required=True, help="the fixed model that continues every prefix")
    ia.add_argument("--samples", type=int, default=8, help="responses sampled per run and problem")
    ia.add_argument("--max-correct", type=int, default=2, help="correct responses kept per run and problem")
    ia.add_argument("--k", type=int, default=8, help="evaluator continuations per prefix")
    ia.add_argument("--positions", type=int, default=4, help="relative positions j / (N + 1), j = 1..N")
    _add_task_args(ia)
    _add_decoding_args(ia, "analyze_implicit_advantage")
    return parser


def _run(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=MODEL_DIR, got {text!r}")
    return name, path


def _task(args):
    from megatron_skpo.analysis.sampling import TaskSpec

    return TaskSpec(args.dataset, args.limit, args.offset, args.prompt_template, not args.no_chat_template,
                    args.prompt_field, args.answer_field, args.max_model_len - args.max_tokens)


def _decoding(args):
    from megatron_skpo.analysis.sampling import Decoding

    return Decoding(args.temperature, args.top_p, args.max_tokens, args.seed, args.dtype, args.max_model_len)


def _check(args, parser: argparse.ArgumentParser) -> None:
    if args.max_tokens < 2:
        parser.error("--max-tokens must be >= 2 (a response needs a prefix and a continuation)")
    if (args.limit is not None and args.limit < 1) or args.offset < 0:
        parser.error("--limit must be >= 1 and --offset >= 0")
    if getattr(args, "group_size", 2) < 2:
        parser.error("--group-size must be >= 2 (advantages are normalised within a group)")
    if args.command == "sign-consistency":
        synthetic = [f for f, v in (("--p", args.p), ("--balanced", args.balanced), ("--trials", args.trials),
                                    ("--json", args.json)) if v]
        if synthetic:
            parser.error(f"{', '.join(synthetic)}: synthetic-mode flags; with --model the groups come from the model")
        if not 0 < args.position_step < 1:
            parser.error(f"--position-step must be in (0, 1), got {args.position_step}")


def _synthetic(args) -> int:
    p = torch.tensor(args.p, dtype=torch.float64) if args.p else balanced_group(args.balanced or 8, args.spread)
    try:
        rows = diagnose(p, args.k or SYNTHETIC_K, trials=args.trials or 4000, seed=args.seed)
    except ValueError as e:
        print(f"skpo-analyze: {e}", file=sys.stderr)
        return 2
    if args.json:
        for row in rows:
            print(json.dumps(dataclasses.asdict(row)))
        return 0
    print(f"p = {[round(v, 4) for v in p.tolist()]}  ({args.trials or 4000} trials)")
    print("| K | MC sign acc | MC all G right | MC MAE | GRPO sign acc | GRPO MAE |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.k} | {r.sign_accuracy:.3f} | {r.all_signs_right:.3f} | {r.mc_mae:.3f} "
              f"| {r.grpo_sign_accuracy:.3f} | {r.grpo_mae:.3f} |")
    return 0


def _shortcut(args, model_dir: Path) -> int:
    from megatron_skpo.analysis import shortcut
    from megatron_skpo.analysis.sampling import extractors_for

    out = Path(args.out)
    result = shortcut.run_shortcut(
        str(model_dir), _task(args), _decoding(args), group_size=args.group_size, positions=args.positions,
        base_responses=args.base_responses, skip_texts=args.skip_template, downstream_budget=args.downstream_budget,
        extractors=extractors_for(args.prompt_template, args.extractors), workers=args.workers,
        grading_timeout=args.grading_timeout, out=out, progress=not args.quiet)
    result.settings["model"] = args.model
    return _report(shortcut, result, out, "shortcut", "segments.jsonl")


def _sign_model(args, model_dir: Path) -> int:
    from megatron_skpo.analysis import sign_model
    from megatron_skpo.analysis.sampling import extractors_for

    out = Path(args.out)
    result = sign_model.run_sign_consistency(
        str(model_dir), _task(args), _decoding(args), group_size=args.group_size, ks=args.k or [8],
        k_truth=args.k_truth, step=args.position_step, extractors=extractors_for(args.prompt_template, args.extractors),
        workers=args.workers, grading_timeout=args.grading_timeout, progress=not args.quiet)
    result.settings["model"] = args.model
    return _report(sign_model, result, out, "sign_consistency")


def _implicit(args, tmp: str) -> int:
    from megatron_skpo.analysis import implicit_advantage
    from megatron_skpo.analysis.sampling import extractors_for
    from megatron_skpo.eval import resolve_model

    names = [n for n, _ in args.runs]
    if len(set(names)) != len(names):
        from megatron_skpo.analysis.sampling import AnalysisError

        raise AnalysisError(f"--runs: run names must be distinct, got {names}")
    runs = {n: str(resolve_model(p, cache_dir=Path(tmp) / n)) for n, p in args.runs}
    evaluator = str(resolve_model(args.evaluator, cache_dir=Path(tmp) / "evaluator"))
    out = Path(args.out)
    result = implicit_advantage.run_implicit_advantage(
        runs, evaluator, _task(args), _decoding(args), samples=args.samples, max_correct=args.max_correct, k=args.k,
        positions=args.positions, extractors=extractors_for(args.prompt_template, args.extractors),
        workers=args.workers, grading_timeout=args.grading_timeout, progress=not args.quiet)
    result.runs = dict(args.runs)
    result.settings["evaluator"] = args.evaluator
    return _report(implicit_advantage, result, out, "implicit_advantage")


def _bypass(args) -> int:
    from megatron_skpo.analysis import bypass_curve

    if args.limit < 1 or args.offset < 0 or args.group_size < 2 or args.positions < 1:
        raise bypass_curve.AnalysisError("--limit and --positions must be >= 1, --offset >= 0, --group-size >= 2")
    spec = bypass_curve.run_spec(args.run, offset=args.offset, limit=args.limit, seed=args.seed, base=args.base)
    out = Path(args.out)
    curve = bypass_curve.run_bypass_curve(args.run, out, spec, group_size=args.group_size, positions=args.positions,
                                          steps=args.steps, workers=args.workers,
                                          grading_timeout=args.grading_timeout, progress=not args.quiet)
    print(bypass_curve.markdown(curve))
    print(f"results in {out}/bypass_curve.json, bypass_curve.png, bypass_curve.md, step_*/")
    return 0


def _report(module, result, out: Path, stem: str, *extra: str) -> int:
    """Write an analysis' JSON, Markdown and PNG (``module.write``), print its table and where it went."""
    module.write(result, out)
    print(module.markdown(result))
    print(f"results in {out}/" + ", ".join([f"{stem}.json", f"{stem}.png", f"{stem}.md", *extra]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "sign-consistency" and args.model is None:
        return _synthetic(args)
    from megatron_skpo.analysis.sampling import AnalysisError
    from megatron_skpo.eval import resolve_model

    if args.command == "bypass-curve":
        from checkpoint_convert.staging import ConvertError

        try:
            return _bypass(args)
        except (AnalysisError, FileNotFoundError, ConvertError) as e:
            print(f"skpo-analyze bypass-curve: {e}", file=sys.stderr)
            return 2
    _check(args, parser)
    try:
        with tempfile.TemporaryDirectory(prefix="skpo-analyze-model-") as tmp:
            if args.command == "implicit-advantage":
                return _implicit(args, tmp)
            model_dir = resolve_model(args.model, cache_dir=tmp)
            if args.command == "shortcut":
                return _shortcut(args, model_dir)
            return _sign_model(args, model_dir)
    except (AnalysisError, FileNotFoundError) as e:
        print(f"skpo-analyze {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
