"""``skpo-analyze sign-consistency --model``: the paper's appendix A.3 on a real model
(definitions in docs/algorithm.md §7).

Per problem, G responses are sampled from q and graded (outcome r_i = +-1). Each response (length
L_i in tokens, a final EOS not counted) is cut at every ``step`` of its length, f_m = m * step
for m = 1..M with f_M < 1: the prefix of t = round(f_m L_i) tokens, clamped to [0, L_i - 1] (t = 0
is q alone). From every prefix, continuations are sampled with the remaining budget
(max_tokens - t) and the prefix plus its continuation is graded:

- the truth V*(i, m): the success rate of ``k_truth`` continuations;
- the estimate V^_K(i, m): the success rate of K other continuations (disjoint from the truth's).

Identical prefixes of one problem (the same token ids, e.g. two responses that start alike) share
the truth's continuations, since their values are the same; every (response, position) still
gets its own K estimate continuations, so the estimates stay independent as in dense MC.

At each position m, truth and estimate are normalised over the G responses
(``group_normalize``: (x - mean) / (std + eps), Bessel std, a constant group gives 0), and so is
GRPO's broadcast outcome advantage (the normalised r_i, the same at every position). Reported
(``sign_stats``): sign accuracy over the entries whose true advantage is not 0, the fraction of
groups with every such sign right, and the MAE over all entries -- by relative position and by the
group's correct count (0..G correct responses, over all positions). The truth is itself a
K_truth-sample estimate: entries with a near-zero true advantage have an uncertain sign.

Cost: problems x G x M x (k_truth + max K) continuations at most (fewer where prefixes repeat);
``plan`` prints the count before anything is sampled.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from megatron_skpo.analysis.metrics import cut_position
from megatron_skpo.analysis.sampling import (
    AnalysisError, Decoding, Grader, TaskProblem, TaskSpec, decode, generate_all, load_task, open_engine)
from megatron_skpo.analysis.sign_consistency import (
    SignStats, group_normalize, sign_stats, sign_stats_by_key, sign_stats_by_position)

if TYPE_CHECKING:  # vLLM's engine module loads only once an analysis runs
    from megatron_skpo.rewards import Grade
    from megatron_skpo.rollout import engine as rollout


def position_fracs(step: float) -> list[float]:
    """step, 2 step, ... strictly below 1 (0.05 -> 0.05 .. 0.95, 19 positions)."""
    if not 0 < step < 1:
        raise ValueError(f"--position-step: must be in (0, 1), got {step}")
    n = math.ceil(1 / step - 1e-9) - 1
    return [round(step * m, 10) for m in range(1, n + 1)] or [step]


@dataclass
class SignRow:
    """Sign statistics of one estimate at one position (``frac``) or correct count (``correct``)."""

    estimate: str  # "mc_k8", ..., or "grpo"
    frac: Optional[float]
    correct: Optional[int]
    stats: SignStats


@dataclass
class SignResult:
    settings: dict
    fracs: list[float]
    ks: list[int]
    problems: int
    responses: dict  # accuracy, mean tokens, correct-count histogram
    continuations: dict  # requested, truth/estimate split, shared prefixes
    by_position: list[SignRow] = field(default_factory=list)
    by_correct: list[SignRow] = field(default_factory=list)
    overall: list[SignRow] = field(default_factory=list)
    grading: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in ("by_position", "by_correct", "overall"):
            d[key] = [{"estimate": r["estimate"], "frac": r["frac"], "correct": r["correct"], **r["stats"]}
                      for r in d[key]]
        return d


def summarize(truth: torch.Tensor, est: dict[str, torch.Tensor], outcome: torch.Tensor, fracs: Sequence[float],
              eps: float = 1e-6) -> tuple[list[SignRow], list[SignRow], list[SignRow]]:
    """Rows by position, by correct count and overall.

    truth [N, G, M] and est[name] [N, G, M]: success rates; outcome [N, G] rewards +-1 (1 = correct).
    Everything is normalised over G (dim 1) at each position.
    """
    norm = lambda v: group_normalize(v.transpose(1, 2), eps).transpose(1, 2)  # noqa: E731 over G
    true_adv = norm(truth.to(torch.float64))
    grpo = group_normalize(outcome.to(torch.float64), eps)[:, :, None].expand_as(true_adv)
    estimates = {**{k: norm(v.to(torch.float64)) for k, v in est.items()}, "grpo": grpo}
    correct = (outcome > 0).sum(dim=1)
    by_pos, by_count, overall = [], [], []
    for name, adv in estimates.items():
        by_pos += [SignRow(name, f, None, s) for f, s in zip(fracs, sign_stats_by_position(adv, true_adv))]
        by_count += [SignRow(name, None, c, s) for c, s in sign_stats_by_key(adv, true_adv, correct).items()]
        flat = lambda x: x.permute(0, 2, 1).reshape(-1, x.shape[1])  # noqa: E731
        overall.append(SignRow(name, None, None, sign_stats(flat(adv), flat(true_adv))))
    return by_pos, by_count, overall


# (problem, prefix token ids) -> the (response, position) entries cut there; equal prefixes share one key
_Prefixes = dict[tuple[int, tuple[int, ...]], list[tuple[int, int]]]


def _checked_ks(ks: Sequence[int], k_truth: int) -> list[int]:
    """The distinct estimate sizes K, ascending, after checking that they and k_truth are >= 1."""
    ks = sorted(set(ks))
    if not ks or ks[0] < 1 or k_truth < 1:
        raise AnalysisError(f"sign-consistency: --k and --k-truth must be >= 1, got {ks}, {k_truth}")
    return ks


def _outcomes(grader: Grader, tokenizer: Any, groups: Sequence[Sequence[rollout.Generation]],
              problems: Sequence[TaskProblem], group_size: int) -> torch.Tensor:
    """[N, G] outcome reward of every response: +1 correct, -1 otherwise."""
    texts = [decode(tokenizer, g.token_ids) for gs in groups for g in gs]
    grades = grader.grade(texts, [p.gold for p in problems for _ in range(group_size)])
    return torch.tensor([1.0 if x.status == "correct" else -1.0 for x in grades]).view(len(problems), group_size)


def _distinct_prefixes(groups: Sequence[Sequence[rollout.Generation]], eos: int, fracs: Sequence[float]) -> _Prefixes:
    """Every response's prefix at every position, grouped by (problem, prefix ids)."""
    content = [[g.token_ids[:-1] if g.token_ids and g.token_ids[-1] == eos else g.token_ids for g in gs]
               for gs in groups]
    prefixes: _Prefixes = {}
    for n, ids_of in enumerate(content):
        for i, ids in enumerate(ids_of):
            for m, f in enumerate(fracs):
                t = cut_position(len(ids), f) if ids else 0
                prefixes.setdefault((n, tuple(ids[:t])), []).append((i, m))
    return prefixes


def _continuation_requests(problems: Sequence[TaskProblem], prefixes: _Prefixes, k_truth: int, k: int,
                           max_tokens: int) -> list[rollout.GenRequest]:
    """One request per distinct prefix: k_truth continuations shared by its users, then K per user."""
    from megatron_skpo.rollout.engine import GenRequest

    return [GenRequest(problems[n].prompt_ids + list(pre), k_truth + k * len(users), max_tokens - len(pre), None)
            for (n, pre), users in prefixes.items()]


def _continuation_plan(requests: Sequence[rollout.GenRequest], *, problems: int, group_size: int, positions: int,
                       k_truth: int, k: int, progress: bool) -> dict[str, int]:
    """How many prefixes and continuations the run costs, announced before anything is sampled."""
    uses = problems * group_size * positions
    plan = {"prefixes": len(requests), "uses": uses, "requested": sum(r.n for r in requests),
            "without_sharing": uses * (k_truth + k)}
    if progress:
        print(f"sign-consistency: {problems} problems x {group_size} responses x {positions} positions -> "
              f"{plan['prefixes']} distinct prefixes, {plan['requested']} continuations (k_truth={k_truth}, "
              f"K={k})", flush=True)
    return plan


def _grade_continuations(grader: Grader, tokenizer: Any, problems: Sequence[TaskProblem], prefixes: _Prefixes,
                         conts: Sequence[Sequence[rollout.Generation]]) -> list[Grade]:
    """The grade of every prefix + continuation text, in request order."""
    texts, golds = [], []
    for (n, pre), gens in zip(prefixes, conts):
        texts += [decode(tokenizer, list(pre) + g.token_ids) for g in gens]
        golds += [problems[n].gold] * len(gens)
    return grader.grade(texts, golds)


def _success_rates(grades: Sequence[Grade], prefixes: _Prefixes, conts: Sequence[Sequence[rollout.Generation]],
                   shape: tuple[int, int, int], ks: Sequence[int],
                   k_truth: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The truth V* and the estimates V^_K (``mc_k{K}``), [N, G, M] success rates, from the grades."""
    k_max = ks[-1]
    truth = torch.zeros(*shape, dtype=torch.float64)
    est = {f"mc_k{k}": torch.zeros(*shape, dtype=torch.float64) for k in ks}
    at = 0
    for ((n, _), users), gens in zip(prefixes.items(), conts):
        ok = torch.tensor([grades[at + j].status == "correct" for j in range(len(gens))], dtype=torch.float64)
        at += len(gens)
        for u, (i, m) in enumerate(users):
            truth[n, i, m] = ok[:k_truth].mean()
            # each user's own K continuations, so that the estimates stay independent of one another
            mine = ok[k_truth + u * k_max: k_truth + (u + 1) * k_max]
            for k in ks:
                est[f"mc_k{k}"][n, i, m] = mine[:k].mean()
    return truth, est


def _response_summary(groups: Sequence[Sequence[rollout.Generation]], outcome: torch.Tensor) -> dict:
    """Response accuracy, mean length in tokens and the number of groups with each correct count."""
    correct = (outcome > 0).sum(dim=1)
    lengths = [len(g.token_ids) for gs in groups for g in gs]
    return {"accuracy": float((outcome > 0).double().mean()), "mean_tokens": sum(lengths) / len(lengths),
            "correct_counts": {str(c): n for c in range(outcome.shape[1] + 1) if (n := int((correct == c).sum()))}}


def run_sign_consistency(model: str, task: TaskSpec, decoding: Decoding, *, group_size: int = 8,
                         ks: Sequence[int] = (8,), k_truth: int = 64, step: float = 0.05,
                         extractors: Sequence[str] = (), workers: int = 2, grading_timeout: float = 5.0,
                         progress: bool = True) -> SignResult:
    """Run the analysis on the HF directory ``model`` (the steps are in the module docstring)."""
    from transformers import AutoTokenizer

    from megatron_skpo.data.prompts import get_template
    from megatron_skpo.rollout.engine import GenRequest

    ks = _checked_ks(ks, k_truth)
    fracs = position_fracs(step)
    template = get_template(task.prompt_template)
    extractors = tuple(extractors or template.extractors)
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(model)
    problems = load_task(task, tokenizer)
    engine = open_engine(model, decoding, template.stop)
    seconds = {"engine_start": time.monotonic() - t0}
    N, G, M, K = len(problems), group_size, len(fracs), ks[-1]
    try:
        t1 = time.monotonic()
        groups = generate_all(engine, [GenRequest(p.prompt_ids, G, decoding.max_tokens, None) for p in problems],
                              "responses", progress)
        seconds["responses"] = time.monotonic() - t1
        with Grader(extractors, workers, grading_timeout) as grader:
            outcome = _outcomes(grader, tokenizer, groups, problems, G)
        prefixes = _distinct_prefixes(groups, engine.eos_token_id, fracs)
        requests = _continuation_requests(problems, prefixes, k_truth, K, decoding.max_tokens)
        plan = _continuation_plan(requests, problems=N, group_size=G, positions=M, k_truth=k_truth, k=K,
                                  progress=progress)
        t2 = time.monotonic()
        conts = generate_all(engine, requests, "continuations", progress)
        seconds["continuations"] = time.monotonic() - t2
    finally:
        engine.close()

    t3 = time.monotonic()
    with Grader(extractors, workers, grading_timeout) as grader:
        grades = _grade_continuations(grader, tokenizer, problems, prefixes, conts)
        grading = dict(grader.counts)
    seconds["grading"] = time.monotonic() - t3
    truth, est = _success_rates(grades, prefixes, conts, (N, G, M), ks, k_truth)
    by_pos, by_count, overall = summarize(truth, est, outcome, fracs)
    return SignResult(
        settings={"model": str(model), **asdict(task), **asdict(decoding), "group_size": G, "ks": ks,
                  "k_truth": k_truth, "position_step": step, "extractors": list(extractors),
                  "stop": list(template.stop)},
        fracs=fracs, ks=ks, problems=N, responses=_response_summary(groups, outcome),
        continuations=plan, by_position=by_pos, by_correct=by_count, overall=overall, grading=grading,
        seconds={k: round(v, 1) for k, v in seconds.items()})


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def markdown(result: SignResult) -> str:
    names = [f"mc_k{k}" for k in result.ks] + ["grpo"]
    head = " | ".join(f"{n} sign acc | {n} MAE" for n in names)
    lines = ["sign accuracy and MAE against the k_truth truth, by relative position:", "",
             f"| position | entries | {head} |", "|---:|---:|" + "---:|---:|" * len(names)]
    for f in result.fracs:
        rows = {r.estimate: r.stats for r in result.by_position if r.frac == f}
        cells = " | ".join(f"{_fmt(rows[n].sign_accuracy)} | {_fmt(rows[n].mae)}" for n in names)
        lines.append(f"| {f:.2f} | {rows[names[0]].entries} | {cells} |")
    lines += ["", "by correct count of the group (all positions):", "",
              f"| correct of G | groups | {head} |", "|---:|---:|" + "---:|---:|" * len(names)]
    counts = sorted({r.correct for r in result.by_correct})
    for c in counts:
        rows = {r.estimate: r.stats for r in result.by_correct if r.correct == c}
        cells = " | ".join(f"{_fmt(rows[n].sign_accuracy)} | {_fmt(rows[n].mae)}" for n in names)
        lines.append(f"| {c} | {result.responses['correct_counts'].get(str(c), 0)} | {cells} |")
    rows = {r.estimate: r.stats for r in result.overall}
    overall_head = " | ".join(f"{n} sign acc | {n} all G right | {n} MAE" for n in names)
    lines += ["", f"| overall | entries | {overall_head} |",
              "|---|---:|" + "---:|---:|---:|" * len(names),
              f"| all | {rows[names[0]].entries} | " + " | ".join(
                  f"{_fmt(rows[n].sign_accuracy)} | {_fmt(rows[n].all_signs_right)} | {_fmt(rows[n].mae)}"
                  for n in names) + " |"]
    s = result.settings
    lines += ["", f"{result.problems} problems x G={s['group_size']} (response accuracy "
                  f"{_fmt(result.responses['accuracy'])}), {len(result.fracs)} positions, K = {result.ks}, "
                  f"k_truth = {s['k_truth']}; {result.continuations['requested']} continuations"]
    return "\n".join(lines) + "\n"


def plot(result: SignResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"mc_k{k}" for k in result.ks] + ["grpo"]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
    for i, n in enumerate(names):
        rows = [r for r in result.by_position if r.estimate == n]
        style = dict(color=f"C{i % 10}", marker="o", markersize=3, label=n, linestyle="--" if n == "grpo" else "-")
        axes[0].plot([r.frac for r in rows], [r.stats.sign_accuracy for r in rows], **style)
        axes[1].plot([r.frac for r in rows], [r.stats.mae for r in rows], **style)
        rows = [r for r in result.by_correct if r.estimate == n]
        axes[2].plot([r.correct for r in rows], [r.stats.sign_accuracy for r in rows], **style)
    axes[0].axhline(0.5, color="grey", linewidth=0.8)
    axes[2].axhline(0.5, color="grey", linewidth=0.8)
    titles = ("sign accuracy by position", "MAE by position", "sign accuracy by correct count")
    xlabels = ("prefix position (fraction of the response)",) * 2 + ("correct responses of G",)
    for ax, title, xlabel in zip(axes, titles, xlabels):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    s = result.settings
    fig.suptitle(f"MC sign consistency: {Path(s['model']).name} on {s['dataset']} ({result.problems} problems, "
                 f"G={s['group_size']}, k_truth={s['k_truth']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: SignResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sign_consistency.json").write_text(json.dumps(result.as_dict(), indent=2))
    (out / "sign_consistency.md").write_text(markdown(result))
    plot(result, out / "sign_consistency.png")
