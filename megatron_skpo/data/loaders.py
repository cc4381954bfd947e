"""Row readers (JSONL, Parquet), dotted field paths, and load-time validation of problems.

Every problem remembers the file and 1-based row it came from, so each validation failure names
both. The policy is ``error`` (raise :class:`DataError` at the first bad row) or ``skip`` (drop
the row and count the reason in :class:`LoadReport`).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

Messages = list[dict]  # chat messages: [{"role": "user", "content": "..."}]
Policy = Literal["error", "skip"]


class DataError(ValueError):
    """A bad dataset row; the message names the file and the 1-based row."""

    def __init__(self, file: str, row: int, msg: str, kind: str = "invalid"):
        super().__init__(f"{file}: row {row}: {msg}")
        self.file, self.row, self.reason, self.kind = file, row, msg, kind


@dataclass(frozen=True)
class Problem:
    """One problem: its prompt (text or chat messages), gold answer, and where it came from."""

    prompt: Union[str, Messages]
    answer: str
    source: str  # file path
    row: int  # 1-based row in ``source``
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def uid(self) -> str:
        return f"{Path(self.source).name}:{self.row}"


@dataclass
class LoadReport:
    """What validation dropped (policy ``skip``) or saw (duplicates kept for benchmarks)."""

    file: str
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    duplicates_kept: int = 0


class FieldMissing(KeyError):
    pass


def get_field(row: Any, dotted: str) -> Any:
    """``row['a']['b'][0]`` for ``'a.b.0'``; integer parts index lists. Raises FieldMissing."""
    node = row
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            raise FieldMissing(f"missing field '{dotted}' (no '{part}')")
    return node


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(1-based row, record) of a ``.jsonl`` or ``.parquet`` file; undecodable JSON yields a DataError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, rec
        return
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(str(path), 0, "unknown format: use .jsonl or .parquet")
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, DataError(str(path), i, f"invalid JSON: {e.msg} at column {e.colno}", "invalid_json")


def answer_to_str(value: Any) -> str:
    """Gold answers must be strings; numbers are converted (145.0 -> '145'); anything else is an error."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"answer must be a string or a number, got {type(value).__name__} {value!r:.60}")
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value).strip()


def _check_prompt(prompt: Any) -> Union[str, Messages]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("empty prompt")
        return prompt
    ok = isinstance(prompt, (list, tuple)) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in prompt)
    if not ok:
        raise ValueError(f"prompt must be text or chat messages [{{role, content}}], got {prompt!r:.80}")
    if not any(m["content"].strip() for m in prompt):
        raise ValueError("empty prompt")
    return [dict(m) for m in prompt]


def load_problems(path: str | Path, prompt_of: Callable[[Any], Any], answer_of: Callable[[Any], Any],
                  policy: Policy = "error", keep: Callable[[Any], bool] = lambda r: True,
                  duplicates: Literal["policy", "keep"] = "policy",
                  limit: Optional[int] = None) -> tuple[list[Problem], LoadReport]:
    """Read and validate problems from ``path``.

    ``prompt_of``/``answer_of`` map a record to the prompt and the raw gold answer (raising
    FieldMissing/ValueError on a bad record). ``keep`` filters rows out silently (a recipe's
    subset, not an error). ``duplicates="keep"`` counts repeated prompts without dropping them
    (benchmarks are evaluated as published).
    """
    report, problems, seen = LoadReport(str(path)), [], {}
    for row, rec in read_rows(path):
        report.rows += 1
        try:
            if isinstance(rec, DataError):
                raise rec
            if not isinstance(rec, dict):
                raise DataError(str(path), row, f"record must be an object, got {type(rec).__name__}", "invalid_json")
            if not keep(rec):
                continue
            problem = _make_problem(rec, prompt_of, answer_of, str(path), row)
            _check_duplicate(problem, seen, duplicates, report)
        except DataError as e:
            if policy == "error":
                raise
            report.skipped[e.kind] += 1
            continue
        problems.append(problem)
        if limit is not None and len(problems) >= limit:
            break
    report.kept = len(problems)
    return problems, report


def _make_problem(rec: dict, prompt_of, answer_of, file: str, row: int) -> Problem:
    values = []
    for name, get, check in (("prompt", prompt_of, _check_prompt), ("answer", answer_of, answer_to_str)):
        try:
            raw = get(rec)
        except FieldMissing as e:
            raise DataError(file, row, str(e).strip("'\""), "missing_field") from None
        except ValueError as e:  # a recipe's own extraction failed (e.g. no \boxed{} in the solution)
            raise DataError(file, row, f"{name}: {e}", f"bad_{name}") from None
        try:
            values.append(check(raw))
        except ValueError as e:
            raise DataError(file, row, f"{name}: {e}", f"bad_{name}") from None
    if not values[1]:
        raise DataError(file, row, "answer: empty answer", "bad_answer")
    return Problem(values[0], values[1], file, row)


def _check_duplicate(problem: Problem, seen: dict, duplicates: str, report: LoadReport) -> None:
    key = " ".join(json.dumps(problem.prompt).split()) if not isinstance(problem.prompt, str) \
        else " ".join(problem.prompt.split())
    first = seen.setdefault(key, problem.row)
    if first == problem.row:
        return
    if duplicates == "keep":
        report.duplicates_kept += 1
        return
    raise DataError(problem.source, problem.row, f"duplicate: same prompt as row {first}", "duplicate")
