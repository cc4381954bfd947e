"""Benchmark metrics over k sampled responses per problem.

- avg@k: mean correctness over all k samples of every problem (the "avg@k" / mean@k of RLVR
  papers; it is an unbiased estimate of pass@1);
- pass@j: the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, j) / C(n, j)`` per problem
  with n samples of which c are correct, averaged over problems (j <= n);
- mean response length in tokens, and the truncation rate (responses stopped by the token cap).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from math import comb
from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct out of ``n`` samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass(frozen=True)
class BenchmarkSummary:
    benchmark: str
    problems: int
    k: int
    avg_at_k: float
    pass_at_k: float
    mean_response_tokens: float
    truncation_rate: float
    no_answer_rate: float
    grading_timeouts: int
    grading_errors: int

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(benchmark: str, records: Sequence[dict], k: int) -> BenchmarkSummary:
    """Summary of per-problem records (``correct``, ``lengths``, ``truncated``, ``statuses`` lists)."""
    if not records:
        raise ValueError(f"{benchmark}: no evaluated problems to summarize")
    samples = [s for r in records for s in r["statuses"]]
    flat = lambda key: [x for r in records for x in r[key]]  # noqa: E731
    return BenchmarkSummary(
        benchmark=benchmark, problems=len(records), k=k,
        avg_at_k=sum(flat("correct")) / len(samples),
        pass_at_k=sum(pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in records) / len(records),
        mean_response_tokens=sum(flat("lengths")) / len(samples),
        truncation_rate=sum(flat("truncated")) / len(samples),
        no_answer_rate=samples.count("no_answer") / len(samples),
        grading_timeouts=samples.count("timeout"), grading_errors=samples.count("error"))


@dataclass(frozen=True)
class PairedChange:
    """avg@k of the same problems at two points, and the noise of the difference."""

    problems: int
    before: float  # mean over problems of the fraction of correct samples
    after: float
    change: float  # after - before
    stderr: float  # standard error of the mean per-problem change (sample std / sqrt(n))
    z: float  # change / stderr (inf when every problem changed by the same amount)


def paired_change(before: Sequence[Sequence[bool]], after: Sequence[Sequence[bool]]) -> PairedChange:
    """Per problem: the fraction of its samples that are correct, before and after; the change's
    standard error comes from the spread of the per-problem changes (paired: problem difficulty,
    which both share, cancels), so it holds both the sampling noise and the problems' spread."""
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"paired_change: need the same >= 2 problems, got {len(before)} and {len(after)}")
    b = [sum(x) / len(x) for x in before]
    a = [sum(x) / len(x) for x in after]
    d = [y - x for x, y in zip(b, a)]
    n, mean = len(d), sum(d) / len(d)
    se = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5 / n ** 0.5
    z = mean / se if se > 0 else (0.0 if mean == 0 else float("inf"))
    return PairedChange(n, sum(b) / n, sum(a) / n, mean, se, z)


def markdown_table(summaries: Sequence[BenchmarkSummary]) -> str:
    """Summary table in Markdown, one row per benchmark (its k named in the row when k differs)."""
    ks = {s.k for s in summaries}
    k = str(ks.pop()) if len(ks) == 1 else "k"
    lines = [f"| benchmark | problems | avg@{k} | pass@{k} | mean tokens | truncated | no answer | timeouts |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        name = s.benchmark if k != "k" else f"{s.benchmark} (k={s.k})"
        lines.append(f"| {name} | {s.problems} | {100 * s.avg_at_k:.1f} | {100 * s.pass_at_k:.1f} | "
                     f"{s.mean_response_tokens:.1f} | {100 * s.truncation_rate:.1f}% | "
                     f"{100 * s.no_answer_rate:.1f}% | {s.grading_timeouts} |")
    return "\n".join(lines) + "\n"
