"""Benchmark evaluation: render prompts, sample k responses, grade, append JSONL, summarise.

A :class:`Task` is one benchmark with its own settings (k, prompt template), reward kind and data
(a built-in recipe or a file in a named format). Per benchmark the run writes
``<out>/<benchmark>.jsonl`` (one record per problem, appended and flushed chunk by chunk) and
``<out>/<benchmark>.run.json`` (its settings), and at the end ``summary.json`` and ``summary.md``
for all benchmarks (a suite adds its table, :mod:`.suite`). A rerun with the same settings skips
problems already in the JSONL (resume); a rerun with different settings for a benchmark is
refused, because mixing them would corrupt its averages. Chunks are fixed by problem index and
each is generated whole under its own seed (:func:`chunk_seed`), so a resumed run regenerates a
chunk with missing problems exactly as the uninterrupted run generated it (a batch of only the
missing ones would sample differently) and its summary is the same.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_skpo.data import LoadReport, Problem, load_format, load_recipe, render_all
from megatron_skpo.data.prompts import get_template
from megatron_skpo.eval.engine import Generator
from megatron_skpo.eval.metrics import BenchmarkSummary, markdown_table, summarize
from megatron_skpo.rewards import RewardPool
from megatron_skpo.rewards.reference import Reference

DEFAULT_EXTRACTORS = ("boxed", "the_answer_is")  # a pool needs them even where the reward reads none (code)


@dataclass(frozen=True)
class EvalSettings:
    """Decoding and grading settings; stored in ``run.json`` and checked on resume."""

    model: str
    k: int = 4
    max_tokens: int = 1024
    temperature: float = 0.6
    top_p: float = 1.0
    prompt_template: str = "qwen_math"
    use_chat_template: bool = True
    max_prompt_tokens: int = 2048
    seed: int = 0


def read_records(path: Path) -> dict[str, dict]:
    """Records by problem uid; a torn last line (killed mid-write) is ignored and rewritten."""
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[rec["uid"]] = rec
    return records


@dataclass(frozen=True)
class Task:
    """One benchmark of a run: where its problems come from and how they are sampled and graded."""

    name: str  # output name: <out>/<name>.jsonl
    settings: EvalSettings
    kind: str = "math"  # reward kind (rewards.kinds): math, multiple_choice, code
    path: Optional[str] = None  # the benchmark's file; None: the built-in recipe
    format: Optional[str] = None  # data format of ``path`` (data/formats.py)
    recipe: Optional[str] = None  # built-in recipe or alias (default: ``name``)
    timeout_s: float = 5.0  # grading timeout per response (code: all of the problem's tests)

    def load(self, limit: Optional[int] = None) -> tuple[list[Problem], LoadReport]:
        if self.path is not None:
            return load_format(self.path, self.format or "fields", policy="skip", duplicates="keep", limit=limit)
        return load_recipe(self.recipe or self.name, policy="skip", duplicates="keep", limit=limit)

    def record(self) -> dict:
        """What a resumed run must share with the results on disk."""
        data = {"path": self.path, "format": self.format} if self.path else {"recipe": self.recipe or self.name}
        return {**asdict(self.settings), "kind": self.kind, "data": data}


def _check_settings(out: Path, task: Task) -> None:
    """Per benchmark ``<name>.run.json``: written on the first run, compared on every resume (an
    output directory of an older version has one ``run.json`` for all its benchmarks)."""
    meta, legacy = out / f"{task.name}.run.json", out / "run.json"
    mine = task.record()
    old = None
    if meta.is_file():
        old = json.loads(meta.read_text())
    elif legacy.is_file() and (out / f"{task.name}.jsonl").is_file():
        old = {**mine, **json.loads(legacy.read_text())}
    if old is not None:
        diff = {k: (old.get(k), v) for k, v in mine.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{out}: {task.name} has results with other settings {diff} (old, new); "
                             "use another --out")
    meta.write_text(json.dumps(mine, indent=2))


def _rewrite_clean(path: Path, records: dict[str, dict]) -> None:
    """Rewrite the JSONL without torn lines, so appends start on a line boundary."""
    if path.is_file():
        path.write_text("".join(json.dumps(r) + "\n" for r in records.values()), encoding="utf-8")


def evaluate_benchmark(task: Task, generator: Generator, tokenizer: Any, pool: RewardPool, out: Path,
                       limit: Optional[int] = None, chunk: int = 16, progress: bool = True) -> BenchmarkSummary:
    """Evaluate one benchmark (resuming), return its summary over the selected problems."""
    from tqdm import tqdm

    settings, name = task.settings, task.name
    problems, report = task.load(limit)
    problems, prompts, _ = render_all(problems, settings.prompt_template, tokenizer, settings.use_chat_template,
                                      settings.max_prompt_tokens, policy="skip", report=report)
    for line in report.summary_lines() if report.skipped_total else ():
        print(f"{name}: {line}")
    path = out / f"{name}.jsonl"
    records = read_records(path)
    _rewrite_clean(path, records)
    tpl = get_template(settings.prompt_template)
    done = sum(p.uid in records for p in problems)
    with open(path, "a", encoding="utf-8") as f, \
            tqdm(total=len(problems), initial=done, desc=name, disable=not progress) as bar:
        for start in range(0, len(problems), chunk):  # chunks fixed by problem index, whatever is done
            idx = range(start, min(start + chunk, len(problems)))
            todo = [i for i in idx if problems[i].uid not in records]
            if not todo:
                continue
            # the whole chunk, under its own seed: a resumed run regenerates exactly what an
            # uninterrupted run generated for it (a batch of only the missing problems would not)
            completions = generator.generate([prompts[i] for i in idx], settings.k, settings.max_tokens,
                                             settings.temperature, settings.top_p, tpl.stop,
                                             seed=chunk_seed(settings.seed, start))
            for rec in _grade_chunk(pool, [problems[i] for i in todo],
                                    [completions[i - start] for i in todo]):
                records[rec["uid"]] = rec
                f.write(json.dumps(rec) + "\n")
            f.flush()
            bar.update(len(todo))
    return summarize(name, [records[p.uid] for p in problems], settings.k)


def chunk_seed(seed: int, start: int) -> int:
    """Seed of the chunk starting at problem ``start``: the generator seeds prompt ``j`` of it with
    ``chunk_seed + j``, so every problem index has its own seed under each ``--seed``."""
    return seed * 2**32 + start


def _grade_chunk(pool: RewardPool, problems: Sequence[Problem], completions: Sequence[Sequence]) -> list[dict]:
    responses = [c.text for cs in completions for c in cs]
    refs = [Reference.of(p.answer, p.meta) for p, cs in zip(problems, completions) for _ in cs]
    grades = iter(pool.grade(responses, refs))
    out = []
    for p, cs in zip(problems, completions):
        gs = [next(grades) for _ in cs]
        out.append({"uid": p.uid, "row": p.row, "gold": p.answer, "responses": [c.text for c in cs],
                    "answers": [g.answer for g in gs], "statuses": [g.status for g in gs],
                    "correct": [g.status == "correct" for g in gs], "lengths": [c.tokens for c in cs],
                    "truncated": [c.truncated for c in cs]})
    return out


def evaluate_tasks(tasks: Sequence[Task], generator: Generator, tokenizer: Any, out: Path,
                   limit: Optional[int] = None, extractors: Optional[Sequence[str]] = None, workers: int = 2,
                   progress: bool = True, suite: Optional[str] = None) -> list[BenchmarkSummary]:
    """Evaluate every task into ``out`` with a reward pool per (kind, timeout, extractors); writes
    summary.json and summary.md (and, for a suite, ``<suite>_table.md``); returns the summaries."""
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:  # every refusal before any generation
        _check_settings(out, task)
    t0, pools, summaries = time.monotonic(), {}, []
    try:
        for task in tasks:
            ex = tuple(extractors or get_template(task.settings.prompt_template).extractors or DEFAULT_EXTRACTORS)
            key = (task.kind, task.timeout_s, ex)
            if key not in pools:
                pools[key] = RewardPool(workers=workers, timeout_s=task.timeout_s, extractors=ex, kind=task.kind)
            summaries.append(evaluate_benchmark(task, generator, tokenizer, pools[key], out, limit,
                                                progress=progress))
    finally:
        for pool in pools.values():
            pool.close()
    _write_summaries(tasks, summaries, out, limit, extractors, time.monotonic() - t0, suite)
    return summaries


def _write_summaries(tasks: Sequence[Task], summaries: Sequence[BenchmarkSummary], out: Path, limit: Optional[int],
                     extractors: Optional[Sequence[str]], seconds: float, suite: Optional[str]) -> None:
    records = [t.record() for t in tasks]
    common = {k: v for k, v in records[0].items() if all(r.get(k) == v for r in records)} if records else {}
    summary = {"settings": common, "limit": limit, "extractors": list(extractors) if extractors else None,
               "seconds_this_run": round(seconds, 1),
               "benchmarks": [{**s.as_dict(), "kind": t.kind, "prompt_template": t.settings.prompt_template,
                               "data": r["data"]} for t, s, r in zip(tasks, summaries, records)]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown_table(summaries))
    if suite is not None:
        from megatron_skpo.eval.suite import paper_table

        label = Path(tasks[0].settings.model).name if tasks else "model"
        (out / f"{suite}_table.md").write_text(paper_table({label: summaries}, suite))


def evaluate(benchmarks: Sequence[str], generator: Generator, tokenizer: Any, settings: EvalSettings,
             out: Path, limit: Optional[int] = None, extractors: Optional[Sequence[str]] = None,
             workers: int = 2, timeout_s: float = 5.0, progress: bool = True) -> list[BenchmarkSummary]:
    """Evaluate built-in benchmarks (recipes) with one set of settings and the math reward."""
    tasks = [Task(b, settings, timeout_s=timeout_s) for b in benchmarks]
    return evaluate_tasks(tasks, generator, tokenizer, out, limit, extractors, workers, progress)
