"""``skpo-analyze implicit-advantage``: how much closer to the answer do the prefixes of one
trained run bring a fixed evaluator than those of another? (definitions in docs/algorithm.md §7)

1. Each run (an exported HF directory) samples ``samples`` responses per problem from the same
   prompts; the correct ones are kept (at most ``max_correct`` per run and problem, the first
   sampled).
2. Each kept response (length L, a final EOS not counted) is cut at ``positions`` interior
   relative positions f_j = j / (positions + 1): t = round(f_j L), clamped to [1, L - 1].
3. One fixed evaluator model continues every prefix K times (q's prompt ids + the prefix's token
   ids, at most max_tokens - t new tokens); R = the fraction of the K prefix+continuation texts that
   are correct.
4. R_run(p, j) = the run's mean R over its kept responses of problem p at position j; across the
   runs that kept a response of p (at least two), A_run(p, j) = (R_run - mean) / (std + eps)
   (``implicit_advantage``: Bessel std, equal rates give 0).
5. Per run and position: the mean of A over problems (and of R, and the number of problems).

The prefixes are continued as token ids, so every run must share the evaluator's tokenizer
(checked; an error names the run otherwise). Engines: one per distinct model directory; a run
whose directory is the evaluator's is sampled on the evaluator's engine.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from megatron_skpo.analysis.metrics import cut_position, implicit_advantage, nanmean
from megatron_skpo.analysis.sampling import (
    AnalysisError, Decoding, Grader, TaskProblem, TaskSpec, decode, generate_all, load_task, open_engine)

if TYPE_CHECKING:  # vLLM's engine module loads only once an analysis runs
    from megatron_skpo.rollout import engine as rollout


def interior_positions(n: int) -> list[float]:
    """j / (n + 1) for j = 1..n (n = 4: 0.2, 0.4, 0.6, 0.8)."""
    if n < 1:
        raise AnalysisError(f"--positions: must be >= 1, got {n}")
    return [j / (n + 1) for j in range(1, n + 1)]


@dataclass
class RunRow:
    """One run at one relative position."""

    run: str
    frac: float
    problems: int  # problems where this run's A is defined (kept responses of >= 2 runs)
    implicit_advantage: float  # mean A over those problems
    success_rate: float  # mean R over those problems
    success_rate_all: float  # mean R over every problem where the run kept a response
    problems_all: int


@dataclass
class ImplicitResult:
    settings: dict
    runs: dict[str, str]  # name -> model directory
    fracs: list[float]
    sampled: dict  # per run: responses, correct, kept, problems with a kept response
    rows: list[RunRow] = field(default_factory=list)
    compared_problems: int = 0  # problems with kept responses of >= 2 runs
    grading: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def per_run_rates(r: torch.Tensor, owner_run: torch.Tensor, owner_problem: torch.Tensor, runs: int,
                  problems: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([R, P, M] mean success rate per run and problem, [R, P] present) from per-response rates.

    r: [X, M] success rate of each kept response's prefixes; owner_run, owner_problem: [X].
    """
    m = r.shape[1]
    total = torch.zeros(runs, problems, m, dtype=torch.float64)
    count = torch.zeros(runs, problems, dtype=torch.float64)
    for x in range(r.shape[0]):
        total[owner_run[x], owner_problem[x]] += r[x].to(torch.float64)
        count[owner_run[x], owner_problem[x]] += 1
    present = count > 0
    return torch.where(present[:, :, None], total / count.clamp(min=1)[:, :, None],
                       torch.full_like(total, float("nan"))), present


def summarize(names: Sequence[str], rates: torch.Tensor, present: torch.Tensor, fracs: Sequence[float]) -> list[RunRow]:
    adv = implicit_advantage(torch.nan_to_num(rates, nan=0.0), present)  # absent runs are masked by ``present``
    defined = ~torch.isnan(adv)
    rows = []
    for ri, name in enumerate(names):
        a_mean, n = nanmean(adv[ri], dim=0)  # over problems: [M]
        r_def, _ = nanmean(torch.where(defined[ri], rates[ri], torch.full_like(rates[ri], float("nan"))), dim=0)
        r_all, n_all = nanmean(rates[ri], dim=0)
        for j, f in enumerate(fracs):
            rows.append(RunRow(name, f, int(n[j]), float(a_mean[j]), float(r_def[j]), float(r_all[j]), int(n_all[j])))
    return rows


# (run, problem, the response's token ids without a final EOS)
_KeptResponse = tuple[int, int, list[int]]


def _check_arguments(runs: dict[str, str], samples: int, max_correct: int, k: int) -> None:
    """Reject too few runs and non-positive counts, naming the flags."""
    if len(runs) < 2:
        raise AnalysisError(f"--runs: compare at least two runs (NAME=HF_DIR ...), got {list(runs)}")
    if samples < 1 or max_correct < 1 or k < 1:
        raise AnalysisError(f"implicit-advantage: --samples, --max-correct and --k must be >= 1, got "
                         f"{samples}, {max_correct}, {k}")


def _evaluator_tokenizer(runs: dict[str, str], evaluator: str) -> Any:
    """The evaluator's tokenizer, after checking that every run has the same vocabulary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(evaluator)
    vocab = tokenizer.get_vocab()
    for name, path in runs.items():
        if path != evaluator and AutoTokenizer.from_pretrained(path).get_vocab() != vocab:
            raise AnalysisError(f"--runs {name}={path}: its tokenizer differs from the evaluator's ({evaluator}); "
                             "prefixes are continued as token ids, so every run must use the evaluator's tokenizer")
    return tokenizer


@contextmanager
def _sampled_runs(runs: dict[str, str], evaluator: str, problems: Sequence[TaskProblem], decoding: Decoding,
                  stop: Sequence[str], samples: int, progress: bool, seconds: dict[str, float]
                  ) -> Iterator[tuple[rollout.VLLMEngine, dict[str, list[list[rollout.Generation]]]]]:
    """Yields the evaluator's engine, still open, and every run's responses, one engine per model directory."""
    from megatron_skpo.rollout.engine import GenRequest

    responses: dict[str, list[list[rollout.Generation]]] = {}
    by_dir: dict[str, list[str]] = {}
    for name in runs:
        by_dir.setdefault(str(Path(runs[name]).resolve()), []).append(name)
    eval_dir = str(Path(evaluator).resolve())
    order = [d for d in by_dir if d != eval_dir] + [eval_dir]  # the evaluator's engine last: it stays open
    engine = None
    try:
        for d in order:
            t0 = time.monotonic()
            engine = open_engine(d, decoding, stop)
            seconds[f"engine_start:{Path(d).name}"] = time.monotonic() - t0
            for name in by_dir.get(d, []):
                t1 = time.monotonic()
                responses[name] = generate_all(engine, [GenRequest(p.prompt_ids, samples, decoding.max_tokens, None)
                                                        for p in problems], f"sample {name}", progress)
                seconds[f"sample:{name}"] = time.monotonic() - t1
            if d != eval_dir:
                engine.close()
                engine = None
        yield engine, responses
    finally:
        if engine is not None:
            engine.close()


def _keep_correct(grader: Grader, tokenizer: Any, runs: dict[str, str], problems: Sequence[TaskProblem],
                  responses: dict[str, list[list[rollout.Generation]]], samples: int, max_correct: int,
                  eos: int) -> tuple[list[_KeptResponse], dict[str, dict]]:
    """The kept correct responses as (run, problem, content ids), and each run's sampling counts."""
    kept: list[_KeptResponse] = []
    sampled = {}
    for ri, name in enumerate(runs):
        texts = [decode(tokenizer, g.token_ids) for gs in responses[name] for g in gs]
        golds = [p.gold for p in problems for _ in range(samples)]
        grades = grader.grade(texts, golds)
        n_correct, n_kept, with_kept = 0, 0, 0
        for pi, gs in enumerate(responses[name]):
            mine = 0
            for si, g in enumerate(gs):
                if grades[pi * samples + si].status != "correct":
                    continue
                n_correct += 1
                ids = g.token_ids[:-1] if g.token_ids and g.token_ids[-1] == eos else g.token_ids
                # a one-token response has no interior position to cut at
                if mine < max_correct and len(ids) >= 2:
                    kept.append((ri, pi, list(ids)))
                    mine += 1
            n_kept += mine
            with_kept += mine > 0
        sampled[name] = {"model": runs[name], "responses": len(texts), "correct": n_correct, "kept": n_kept,
                         "problems_with_kept": with_kept}
    return kept, sampled


def _continuation_requests(kept: Sequence[_KeptResponse], problems: Sequence[TaskProblem],
                           fracs: Sequence[float], k: int,
                           max_tokens: int) -> tuple[list[list[int]], list[rollout.GenRequest]]:
    """The cut positions of each kept response, and the evaluator's K continuations of each prefix."""
    from megatron_skpo.rollout.engine import GenRequest

    cuts = [[cut_position(len(ids), f, lo=1) for f in fracs] for _, _, ids in kept]
    requests = [GenRequest(problems[pi].prompt_ids + ids[:t], k, max_tokens - t, None)
                for (_, pi, ids), ts in zip(kept, cuts) for t in ts]
    return cuts, requests


def _continuation_rates(grader: Grader, tokenizer: Any, kept: Sequence[_KeptResponse],
                        cuts: Sequence[Sequence[int]], conts: Sequence[Sequence[rollout.Generation]],
                        problems: Sequence[TaskProblem], k: int) -> torch.Tensor:
    """[X, M] success rate R of each kept response's prefix continuations."""
    m = len(cuts[0])
    texts, golds = [], []
    for x, (_, pi, ids) in enumerate(kept):
        for j, t in enumerate(cuts[x]):
            texts += [decode(tokenizer, ids[:t] + g.token_ids) for g in conts[x * m + j]]
            golds += [problems[pi].gold] * k
    ok = torch.tensor([g.status == "correct" for g in grader.grade(texts, golds)], dtype=torch.float64)
    return ok.view(len(kept), m, k).mean(dim=2)


def run_implicit_advantage(runs: dict[str, str], evaluator: str, task: TaskSpec, decoding: Decoding, *,
                           samples: int = 8, max_correct: int = 2, k: int = 8, positions: int = 4,
                           extractors: Sequence[str] = (), workers: int = 2, grading_timeout: float = 5.0,
                           progress: bool = True) -> ImplicitResult:
    """Run the analysis; ``runs`` maps a name to an HF directory, ``evaluator`` is an HF directory."""
    from megatron_skpo.data.prompts import get_template

    _check_arguments(runs, samples, max_correct, k)
    fracs = interior_positions(positions)
    template = get_template(task.prompt_template)
    extractors = tuple(extractors or template.extractors)
    tokenizer = _evaluator_tokenizer(runs, evaluator)
    problems = load_task(task, tokenizer)
    names = list(runs)
    seconds: dict[str, float] = {}
    # the evaluator's engine stays open from sampling through the continuations, then closes
    with _sampled_runs(runs, evaluator, problems, decoding, template.stop, samples, progress,
                       seconds) as (engine, responses):
        t0 = time.monotonic()
        with Grader(extractors, workers, grading_timeout) as grader:
            kept, sampled = _keep_correct(grader, tokenizer, runs, problems, responses, samples, max_correct,
                                          engine.eos_token_id)
        seconds["grading_responses"] = time.monotonic() - t0
        if not kept:
            raise AnalysisError("implicit-advantage: no run produced a correct response of two or more tokens; "
                             "nothing to cut (raise --samples or --limit)")
        cuts, requests = _continuation_requests(kept, problems, fracs, k, decoding.max_tokens)
        t1 = time.monotonic()
        conts = generate_all(engine, requests, "evaluator continuations", progress)
        seconds["evaluate"] = time.monotonic() - t1

    t2 = time.monotonic()
    with Grader(extractors, workers, grading_timeout) as grader:
        r = _continuation_rates(grader, tokenizer, kept, cuts, conts, problems, k)
        grading = dict(grader.counts)
    seconds["grading_continuations"] = time.monotonic() - t2
    rates, present = per_run_rates(r, torch.tensor([x[0] for x in kept]), torch.tensor([x[1] for x in kept]),
                                   len(names), len(problems))
    return ImplicitResult(
        settings={"evaluator": evaluator, **asdict(task), **asdict(decoding), "samples": samples,
                  "max_correct": max_correct, "k": k, "positions": positions, "extractors": list(extractors)},
        runs=dict(runs), fracs=fracs, sampled=sampled, rows=summarize(names, rates, present, fracs),
        compared_problems=int((present.sum(dim=0) >= 2).sum()), grading=grading,
        seconds={key: round(v, 1) for key, v in seconds.items()})


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def markdown(result: ImplicitResult) -> str:
    names = list(result.runs)
    lines = ["implicit advantage (mean over problems of (R - mean) / std across runs) | evaluator success rate R:", "",
             "| run | " + " | ".join(f"{f:.2f}" for f in result.fracs) + " | kept responses | problems |",
             "|---|" + "---:|" * len(result.fracs) + "---:|---:|"]
    for name in names:
        rows = [r for r in result.rows if r.run == name]
        cells = " | ".join(f"{_fmt(r.implicit_advantage)} / {_fmt(r.success_rate, 2)}" for r in rows)
        s = result.sampled[name]
        lines.append(f"| {name} | {cells} | {s['kept']} of {s['correct']} correct | {rows[0].problems} |")
    lines += ["", f"{result.compared_problems} problems with kept responses of >= 2 runs; evaluator "
                  f"{result.settings['evaluator']}, K = {result.settings['k']}"]
    return "\n".join(lines) + "\n"


def plot(result: ImplicitResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for i, name in enumerate(result.runs):
        rows = [r for r in result.rows if r.run == name]
        fr = [r.frac for r in rows]
        axes[0].plot(fr, [r.implicit_advantage for r in rows], marker="o", color=f"C{i % 10}", label=name)
        axes[1].plot(fr, [r.success_rate for r in rows], marker="o", color=f"C{i % 10}", label=name)
    axes[0].axhline(0.0, color="grey", linewidth=0.8)
    for ax, title in zip(axes, ("implicit advantage (R - mean) / std", "evaluator success rate R")):
        ax.set_title(title)
        ax.set_xlabel("prefix position (fraction of the response)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"implicit advantage, evaluator {Path(result.settings['evaluator']).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: ImplicitResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "implicit_advantage.json").write_text(json.dumps(result.as_dict(), indent=2))
    (out / "implicit_advantage.md").write_text(markdown(result))
    plot(result, out / "implicit_advantage.png")
