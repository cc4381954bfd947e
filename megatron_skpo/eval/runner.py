"""Benchmark evaluation: render prompts, sample k responses, grade, append JSONL, summarise.

Per benchmark the run writes ``<out>/<benchmark>.jsonl`` (one record per problem, appended and
flushed chunk by chunk) and, at the end, ``summary.json`` and ``summary.md`` for all benchmarks.
A rerun with the same settings skips problems already in the JSONL (resume); a rerun with
different settings is refused, because mixing them would corrupt the averages.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_skpo.data import load_recipe, render_all
from megatron_skpo.data.prompts import get_template
from megatron_skpo.eval.engine import Generator
from megatron_skpo.eval.metrics import BenchmarkSummary, markdown_table, summarize
from megatron_skpo.rewards import RewardPool


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


def _check_settings(out: Path, settings: EvalSettings) -> None:
    meta = out / "run.json"
    mine = asdict(settings)
    if meta.is_file():
        old = json.loads(meta.read_text())
        diff = {k: (old.get(k), v) for k, v in mine.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{out}: has results with other settings {diff} (old, new); use another --out")
    meta.write_text(json.dumps(mine, indent=2))


def _rewrite_clean(path: Path, records: dict[str, dict]) -> None:
    """Rewrite the JSONL without torn lines, so appends start on a line boundary."""
    if path.is_file():
        path.write_text("".join(json.dumps(r) + "\n" for r in records.values()), encoding="utf-8")


def evaluate_benchmark(name: str, generator: Generator, tokenizer: Any, pool: RewardPool,
                       settings: EvalSettings, out: Path, limit: Optional[int] = None,
                       chunk: int = 16, progress: bool = True) -> BenchmarkSummary:
    """Evaluate one benchmark (resuming), return its summary over the selected problems."""
    from tqdm import tqdm

    problems, _ = load_recipe(name, policy="skip", duplicates="keep", limit=limit)
    problems, prompts, _ = render_all(problems, settings.prompt_template, tokenizer, settings.use_chat_template,
                                      settings.max_prompt_tokens, policy="skip")
    path = out / f"{name}.jsonl"
    records = read_records(path)
    _rewrite_clean(path, records)
    todo = [i for i, p in enumerate(problems) if p.uid not in records]
    tpl = get_template(settings.prompt_template)
    with open(path, "a", encoding="utf-8") as f, \
            tqdm(total=len(problems), initial=len(problems) - len(todo), desc=name, disable=not progress) as bar:
        for start in range(0, len(todo), chunk):
            idx = todo[start : start + chunk]
            completions = generator.generate([prompts[i] for i in idx], settings.k, settings.max_tokens,
                                             settings.temperature, settings.top_p, tpl.stop)
            for rec in _grade_chunk(pool, [problems[i] for i in idx], completions):
                records[rec["uid"]] = rec
                f.write(json.dumps(rec) + "\n")
            f.flush()
            bar.update(len(idx))
    return summarize(name, [records[p.uid] for p in problems], settings.k)


def _grade_chunk(pool: RewardPool, problems: Sequence, completions: Sequence[Sequence]) -> list[dict]:
    responses = [c.text for cs in completions for c in cs]
    golds = [p.answer for p, cs in zip(problems, completions) for _ in cs]
    grades = iter(pool.grade(responses, golds))
    out = []
    for p, cs in zip(problems, completions):
        gs = [next(grades) for _ in cs]
        out.append({"uid": p.uid, "row": p.row, "gold": p.answer, "responses": [c.text for c in cs],
                    "answers": [g.answer for g in gs], "statuses": [g.status for g in gs],
                    "correct": [g.status == "correct" for g in gs], "lengths": [c.tokens for c in cs],
                    "truncated": [c.truncated for c in cs]})
    return out


def evaluate(benchmarks: Sequence[str], generator: Generator, tokenizer: Any, settings: EvalSettings,
             out: Path, limit: Optional[int] = None, extractors: Optional[Sequence[str]] = None,
             workers: int = 2, timeout_s: float = 5.0, progress: bool = True) -> list[BenchmarkSummary]:
    """Evaluate every benchmark into ``out``; writes summary.json and summary.md; returns the summaries."""
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)
    extractors = extractors or get_template(settings.prompt_template).extractors
    t0 = time.monotonic()
    with RewardPool(workers=workers, timeout_s=timeout_s, extractors=extractors) as pool:
        summaries = [evaluate_benchmark(b, generator, tokenizer, pool, settings, out, limit, progress=progress)
                     for b in benchmarks]
    summary = {"settings": asdict(settings), "limit": limit, "extractors": list(extractors),
               "seconds_this_run": round(time.monotonic() - t0, 1),
               "benchmarks": [s.as_dict() for s in summaries]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown_table(summaries))
    return summaries
