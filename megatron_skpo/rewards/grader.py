"""In-process math grading: extract -> normalise -> math-verify, and the grade -> reward map.

``grade_math`` is what a worker process of :class:`~megatron_skpo.rewards.pool.RewardPool` runs in
its main thread. It has no timeout of its own (math-verify's ``signal.alarm`` timeouts are turned
off): the pool enforces one hard wall-clock limit per item by killing the worker, which also
covers sympy stuck in C code where an alarm would never fire. Call it directly only on trusted
input; :func:`megatron_skpo.rewards.math_reward` is the safe entry point.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, Optional, Sequence, Union

from megatron_skpo.rewards.extract import PLAIN_NUMBER, extract_answer, normalize_answer

Gold = Union[str, int, float]
Status = Literal["correct", "incorrect", "no_answer", "timeout", "error"]
STATUSES: tuple[Status, ...] = ("correct", "incorrect", "no_answer", "timeout", "error")


@dataclass(frozen=True)
class Grade:
    """Outcome of grading one response: whether it is correct (``status``) and, separately, its
    reward when that is not simply the correct/incorrect value of :class:`RewardSpec` (``score``:
    partial credit of code tests, a custom reward's own value, a weighted combination)."""

    status: Status
    answer: Optional[str] = None  # the extracted final answer (None when nothing was extracted)
    detail: str = ""  # exception text for status "error"
    score: Optional[float] = None  # the reward itself; None: ``reward_of(status, spec)``

    @property
    def correct(self) -> bool:
        return self.status == "correct"


@dataclass(frozen=True)
class RewardSpec:
    """Reward values per outcome. SKPO uses +1/-1; ``zero_one`` is the 0/1 variant."""

    correct: float = 1.0
    incorrect: float = -1.0
    format_penalty: float = 0.0  # added to ``incorrect`` when no final answer was extracted

    @classmethod
    def preset(cls, name: str, format_penalty: float = 0.0) -> "RewardSpec":
        presets = {"pm1": (1.0, -1.0), "zero_one": (1.0, 0.0)}
        if name not in presets:
            raise ValueError(f"reward preset: got {name!r}; allowed values: {', '.join(presets)}")
        return cls(*presets[name], format_penalty=format_penalty)


def gold_text(gold: object, index: int = 0) -> str:
    """A gold answer as text: strings unchanged, numbers as written (``3`` -> ``"3"``, ``145.0`` ->
    ``"145"``, ``2.5`` -> ``"2.5"``), as JSON or Parquet fields deliver them.

    Anything else (None, bool, lists, NaN) is a data error, not a wrong answer: :class:`TypeError`
    naming item ``index`` of the batch, instead of an "error" grade that scores every response -1.
    """
    if isinstance(gold, str):
        return gold
    if isinstance(gold, numbers.Real) and not isinstance(gold, bool) and math.isfinite(gold):
        if isinstance(gold, numbers.Integral):
            return str(int(gold))
        value = float(gold)
        return str(int(value)) if value.is_integer() else repr(value)
    raise TypeError(f"gold answer {index}: must be a string or a finite number, "
                    f"got {type(gold).__name__} {gold!r:.60}")


def reward_of(status: Status, spec: RewardSpec, score: Optional[float] = None) -> float:
    """Reward of one graded item: its own ``score`` if it has one, else by status (timeouts and
    parser errors score as incorrect)."""
    if score is not None:
        return score
    if status == "correct":
        return spec.correct
    if status == "no_answer":
        return spec.incorrect + spec.format_penalty
    return spec.incorrect


def _mv_parse(expr: str):
    from math_verify import parse

    # Wrapping in \boxed{} makes math-verify take the whole string as one LaTeX answer.
    return parse("\\boxed{" + expr + "}", parsing_timeout=None)


def answers_match(gold: str, pred: str) -> bool:
    """math-verify equivalence of two bare answers (gold first; it is not symmetric)."""
    from math_verify import verify

    gold, pred = normalize_answer(gold), normalize_answer(pred)
    exact = _long_numbers_match(gold, pred)
    if exact is not None:
        return exact
    g, p = _mv_parse(gold), _mv_parse(pred)
    if verify(g, p, timeout_seconds=None):
        return True
    if "%" in gold + pred:  # the percent sign is optional (MATH convention): 12.5\% == 12.5
        unpercent = lambda s: s.replace("\\%", "").replace("%", "").strip()  # noqa: E731
        if verify(_mv_parse(unpercent(gold)), _mv_parse(unpercent(pred)), timeout_seconds=None):
            return True
    # Neither side parsed as maths (words such as "Tuesday"): compare the normalised text.
    return not g and not p and _plain(gold) == _plain(pred)


LONG_NUMBER_DIGITS = 1000  # past this, plain numbers are compared here (math-verify fails past 4300 digits)


def _long_numbers_match(gold: str, pred: str) -> Optional[bool]:
    """Exact decimal comparison of two plain numbers when either is over :data:`LONG_NUMBER_DIGITS`
    characters; None otherwise (math-verify decides).

    math-verify converts through Python ``int``, whose default limit (``sys.get_int_max_str_digits``,
    4300 digits) made a correct 100,000-digit answer grade incorrect. ``Decimal`` has no such limit
    and compares exactly (``007`` == ``7``, ``2.50`` == ``2.5``).
    """
    if max(len(gold), len(pred)) <= LONG_NUMBER_DIGITS:
        return None
    if not (PLAIN_NUMBER.fullmatch(gold) and PLAIN_NUMBER.fullmatch(pred)):
        return None
    return Decimal(gold) == Decimal(pred)


def _plain(s: str) -> str:
    s = re.sub(r"\\(?:text|mathrm|textbf)\s*\{([^{}]*)\}", r"\1", normalize_answer(s))
    return re.sub(r"\s+", " ", s).strip().lower()


def grade_math(response: str, gold: Gold, extractors: Sequence[str] = ("boxed", "the_answer_is")) -> Grade:
    """Grade ``response`` against ``gold``; never raises on the response (errors become status
    "error"). A gold answer that is neither text nor a number is a TypeError (:func:`gold_text`)."""
    gold = gold_text(gold)
    try:
        pred = extract_answer(response, extractors)
        if pred is None:
            return Grade("no_answer")
        return Grade("correct" if answers_match(gold, pred) else "incorrect", pred)
    except Exception as e:  # a parser crash is an incorrect answer, counted, never raised
        return Grade("error", None, f"{type(e).__name__}: {e}"[:300])
