"""Row readers (JSONL, Parquet), dotted field paths, and load-time validation of problems.

A :data:`Reader` maps a record to its raw prompt, gold answer and ``meta`` (tests, choices, extra
fields: :mod:`megatron_skpo.rewards.reference`); :func:`field_reader` builds one from a function
per part, and :mod:`.formats` registers the named ones. Every problem remembers the file and
1-based row it came from, so each validation failure names both. The policy is ``error`` (raise :class:`DataError` at the first bad row) or ``skip`` (drop
the row and count it in :class:`LoadReport`, per reason and per file, with the first rows of each
so a log line can point at them). A JSONL line that is not UTF-8 is a bad row like any other
(reason ``not_utf8``, named by file and line), not an exception that ends the load; so are a line
nested too deeply to parse (``invalid_json``) and a line over :data:`MAX_LINE_BYTES` (``line_too_long``,
read with a cap and skipped to its end without being held).
:class:`LoadReport` prints itself (:meth:`LoadReport.summary_lines`) and flattens into metrics
(:meth:`LoadReport.metrics`); prompts dropped for length by ``render_all`` join the same report.
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


EXAMPLE_ROWS = 5  # rows remembered per (file, reason) for the summary


@dataclass
class LoadReport:
    """What validation dropped (policy ``skip``) or saw (duplicates kept for benchmarks).

    ``skipped`` counts by reason over all files; ``skipped_by_file`` by file, then reason; ``examples``
    keeps the first :data:`EXAMPLE_ROWS` rows and the first message of each (file, reason).
    """

    file: str
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    duplicates_kept: int = 0
    skipped_by_file: dict[str, Counter] = field(default_factory=dict)  # file -> reason -> count
    examples: dict[tuple[str, str], tuple[list[int], str]] = field(default_factory=dict)

    def skip(self, error: DataError) -> None:
        """Count ``error``'s row as skipped (per reason and per file)."""
        self.skipped[error.kind] += 1
        self.skipped_by_file.setdefault(error.file, Counter())[error.kind] += 1
        rows, _ = self.examples.setdefault((error.file, error.kind), ([], error.reason))
        if len(rows) < EXAMPLE_ROWS:
            rows.append(error.row)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary_lines(self) -> list[str]:
        """Printable one-line summaries: the totals, then one line per file and reason skipped."""
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
        head = f"{self.file}: {self.rows} rows read, {self.kept} kept, {self.skipped_total} skipped"
        lines = [head + (f" ({counts})" if counts else "")
                 + (f", {self.duplicates_kept} duplicate prompts kept" if self.duplicates_kept else "")]
        for file, reasons in sorted(self.skipped_by_file.items()):
            for reason, n in sorted(reasons.items()):
                rows, first = self.examples[(file, reason)]
                more = ", ..." if n > len(rows) else ""
                lines.append(f"{file}: skipped {n} {reason} (rows {', '.join(map(str, rows))}{more}; "
                             f"first: {first})")
        return lines

    def metrics(self, prefix: str = "data") -> dict[str, float]:
        """Flat numbers for a metrics log: ``{prefix}/rows``, ``/kept``, ``/skipped``,
        ``/skipped/<reason>`` (every file together) and ``/duplicates_kept``."""
        out = {f"{prefix}/rows": float(self.rows), f"{prefix}/kept": float(self.kept),
               f"{prefix}/skipped": float(self.skipped_total), f"{prefix}/duplicates_kept": float(self.duplicates_kept)}
        out.update({f"{prefix}/skipped/{reason}": float(n) for reason, n in sorted(self.skipped.items())})
        return out


_BLANK = object()  # a blank JSONL line: no row


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


MAX_LINE_BYTES = 64 * 1024 * 1024  # a JSONL line longer than this is a bad row, never held whole


def read_rows(path: str | Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, Any]]:
    """(1-based row, record) of a ``.jsonl`` or ``.parquet`` file.

    A line that is not UTF-8, not JSON (or too deeply nested for the parser), or longer than
    ``max_line_bytes`` yields a DataError (reasons ``not_utf8``, ``invalid_json``, ``line_too_long``)
    in place of its record: lines are read with a cap, so a multi-GB file without a newline costs
    one bad row, not the machine's memory. A Parquet file that cannot be read is a DataError
    naming it (row 0).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path}: no such file")
    if path.suffix == ".parquet":
        yield from enumerate(_parquet_rows(path), 1)
        return
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(str(path), 0, "unknown format: use .jsonl or .parquet")
    with open(path, "rb") as f:  # bytes: each line is decoded on its own, so one bad byte costs one row
        i = 0
        while raw := f.readline(max_line_bytes + 1):
            i += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                _skip_line(f)
                yield i, DataError(str(path), i, f"line longer than {max_line_bytes} bytes", "line_too_long")
                continue
            rec = _parse_line(raw, str(path), i)
            if rec is not _BLANK:
                yield i, rec


def _skip_line(f, block: int = 1 << 20) -> None:
    """Read on to the end of the current line, a block at a time, keeping nothing."""
    while (chunk := f.readline(block)) and not chunk.endswith(b"\n"):
        pass


def _parse_line(raw: bytes, file: str, i: int) -> Any:
    """One JSONL line's record, or a DataError naming the file and line."""
    try:
        line = raw.decode("utf-8-sig" if i == 1 else "utf-8")  # a leading BOM is not data
    except UnicodeDecodeError as e:
        return DataError(file, i, f"not UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line",
                         "not_utf8")
    if not line.strip():
        return _BLANK
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return DataError(file, i, f"invalid JSON: {e.msg} at column {e.colno}", "invalid_json")
    except RecursionError:
        return DataError(file, i, "invalid JSON: nested too deeply to parse", "invalid_json")
    except ValueError as e:  # e.g. an integer over Python's digit limit
        return DataError(file, i, f"invalid JSON: {' '.join(str(e).split())[:200]}", "invalid_json")


def _parquet_rows(path: Path) -> Iterator[Any]:
    """Parquet records batch by batch; an unreadable file is a DataError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(str(path), 0, f"cannot read Parquet: {' '.join(str(e).split())[:200]}",
                        "bad_parquet") from None


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


class BadRow(ValueError):
    """A row a reader cannot use, counted under ``reason`` (``bad_tests``, ``multi_answer``, ...)."""

    def __init__(self, reason: str, msg: str):
        super().__init__(msg)
        self.reason = reason


@dataclass(frozen=True)
class RawProblem:
    """What a reader takes from one record, before validation."""

    prompt: Any  # text or chat messages
    answer: Any  # gold answer (a string or a number); "" for code problems graded by their tests
    meta: dict = field(default_factory=dict)  # tests, fn_name, choices, extra (rewards/reference.py)


Reader = Callable[[dict], RawProblem]  # raises FieldMissing, BadRow or ValueError on a bad record


def field_reader(prompt_of: Callable[[Any], Any], answer_of: Callable[[Any], Any],
                 meta_of: Callable[[Any], dict] = lambda r: {}) -> Reader:
    """A reader from one function per part; a ValueError of a part counts as ``bad_<part>``."""
    def part(name: str, get: Callable[[Any], Any], rec: dict) -> Any:
        try:
            return get(rec)
        except (FieldMissing, BadRow):
            raise
        except ValueError as e:  # a recipe's own extraction failed (e.g. no \boxed{} in the solution)
            raise BadRow(f"bad_{name}", f"{name}: {e}") from None

    return lambda rec: RawProblem(part("prompt", prompt_of, rec), part("answer", answer_of, rec),
                                  part("meta", meta_of, rec))


def load_problems(path: str | Path, read: Reader, policy: Policy = "error",
                  keep: Callable[[Any], bool] = lambda r: True,
                  duplicates: Literal["policy", "keep"] = "policy",
                  limit: Optional[int] = None, max_rows: Optional[int] = None) -> tuple[list[Problem], LoadReport]:
    """Read and validate problems from ``path`` (at most ``max_rows`` rows read, good or bad).

    ``read`` maps a record to its raw prompt, gold answer and meta (:func:`field_reader`, or a
    named format in :mod:`.formats`), raising FieldMissing/BadRow/ValueError on a bad record.
    ``keep`` filters rows out silently (a recipe's subset, not an error). ``duplicates="keep"``
    counts repeated prompts without dropping them (benchmarks are evaluated as published).
    """
    report, problems, seen = LoadReport(str(path)), [], {}
    for row, rec in read_rows(path):
        if max_rows is not None and report.rows >= max_rows:
            break
        report.rows += 1
        try:
            if isinstance(rec, DataError):
                raise rec
            if not isinstance(rec, dict):
                raise DataError(str(path), row, f"record must be an object, got {type(rec).__name__}", "invalid_json")
            if not keep(rec):
                continue
            problem = _make_problem(rec, read, str(path), row)
            _check_duplicate(problem, seen, duplicates, report)
        except DataError as e:
            if policy == "error":
                raise
            report.skip(e)
            continue
        problems.append(problem)
        if limit is not None and len(problems) >= limit:
            break
    report.kept = len(problems)
    return problems, report


def _make_problem(rec: dict, read: Reader, file: str, row: int) -> Problem:
    try:
        raw = read(rec)
    except FieldMissing as e:
        raise DataError(file, row, str(e).strip("'\""), "missing_field") from None
    except BadRow as e:
        raise DataError(file, row, str(e), e.reason) from None
    except (ValueError, RecursionError) as e:
        raise DataError(file, row, str(e) or type(e).__name__, "bad_row") from None
    values = []
    for name, value, check in (("prompt", raw.prompt, _check_prompt), ("answer", raw.answer, answer_to_str)):
        try:
            values.append(check(value))
        except ValueError as e:
            raise DataError(file, row, f"{name}: {e}", f"bad_{name}") from None
    if not values[1] and not raw.meta.get("tests"):  # code problems are graded by their tests alone
        raise DataError(file, row, "answer: empty answer", "bad_answer")
    return Problem(values[0], values[1], file, row, dict(raw.meta))


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
