"""The reward registry, custom rewards, and weighted combinations (what ``reward.kind`` names).

A reward is a function ``(response, reference, context) -> Grade`` registered under a name with the
reference fields it needs (:class:`RewardKind`). The grade says whether the response is correct
(``status``) and, when the reward is not simply ``reward.correct`` / ``reward.incorrect``, its own
``score``. Built in:

- ``math``: the final answer against the gold answer (math-verify; needs ``answer``);
- ``multiple_choice``: the chosen option letter against the gold letter (needs ``answer``);
- ``code``: the response's program against the problem's tests in the sandbox (needs ``tests``);
- ``format``: whether the response states a final answer the extractors find (needs nothing);
  "correct" here means "well formatted", so use it as a term of a weighted reward.

A :class:`RewardPlan` is what the grading workers run: one term (a registered kind, or ``custom``
with ``path/to/file.py:function`` or ``package.module:function``) or several weighted ones. A
weighted reward's score is the sum of weight x each term's reward; whether it is correct is the
first term's verdict, and a term that fails makes the whole item an error (scored incorrect).

A custom reward is called as ``fn(response: str, reference: dict) -> float | bool | dict`` with
``reference = {"answer", "tests", "fn_name", "choices", **extra_fields}``. It returns a bool
(correct or not; rewarded ``reward.correct`` / ``reward.incorrect``), a number (the reward; correct
when it is >= ``reward.correct``), or a dict ``{"score": float, "correct": bool, "answer": str}``
("correct" and "answer" optional). It runs in the worker pool like a built-in reward: the same
per-item timeout, and an exception or a bad return value is a counted error, scored incorrect.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from megatron_skpo.registry import Registry
from megatron_skpo.rewards.code import CodeOptions, grade_code
from megatron_skpo.rewards.extract import extract_answer
from megatron_skpo.rewards.grader import Grade, RewardSpec, grade_math, reward_of
from megatron_skpo.rewards.reference import Reference

CUSTOM = "custom"
CUSTOM_SIGNATURE = "fn(response: str, reference: dict) -> float | bool | dict"


@dataclass(frozen=True)
class Context:
    """What every reward is graded with besides the response and its reference."""

    spec: RewardSpec = RewardSpec()
    extractors: tuple[str, ...] = ("boxed", "the_answer_is")
    code: CodeOptions = CodeOptions()


@dataclass(frozen=True)
class RewardKind:
    name: str
    grade: Callable[[str, Reference, Context], Grade]
    needs: tuple[str, ...]  # Reference fields every problem must have: "answer", "tests", "choices"
    help: str


REWARDS: Registry[RewardKind] = Registry("reward")


def register_reward(name: str, needs: tuple[str, ...], help: str) -> Callable:
    """Register ``fn(response, reference, context) -> Grade`` as reward ``name``."""
    def deco(fn: Callable[[str, Reference, Context], Grade]) -> Callable:
        REWARDS.register(name)(RewardKind(name, fn, needs, help))
        return fn

    return deco


@register_reward("math", ("answer",), "final answer equivalent to the gold answer (math-verify)")
def _math(response: str, ref: Reference, ctx: Context) -> Grade:
    return grade_math(response, ref.answer, ctx.extractors)


@register_reward("multiple_choice", ("answer",), "chosen option letter equals the gold letter")
def _multiple_choice(response: str, ref: Reference, ctx: Context) -> Grade:
    from megatron_skpo.rewards.choice import grade_choice

    return grade_choice(response, ref)


@register_reward("code", ("tests",), "the last ```python block passes every test in the sandbox")
def _code(response: str, ref: Reference, ctx: Context) -> Grade:
    return grade_code(response, ref, ctx.spec, ctx.code)


@register_reward("format", (), "the response states a final answer the extractors find")
def _format(response: str, ref: Reference, ctx: Context) -> Grade:
    found = extract_answer(response, ctx.extractors)
    return Grade("correct" if found is not None else "incorrect", found)


def load_custom(target: str, where: str = "reward.custom") -> Callable:
    """The function ``target`` names (``path/to/file.py:function`` or ``package.module:function``),
    checked to accept ``(response, reference)``; ValueError naming ``where`` otherwise."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{where}: got {target!r}; expected path/to/file.py:function or package.module:function")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"{where}: no such file {path} (from {target!r})")
        name = "skpo_custom_reward_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"{where}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise ValueError(f"{where}: cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{where}: {module_name} has no function {attr!r}")
    try:
        inspect.signature(fn).bind("response", {})
    except TypeError:
        raise ValueError(f"{where}: {attr}{inspect.signature(fn)} cannot be called as {CUSTOM_SIGNATURE}") from None
    except ValueError:  # builtins without a signature: accept, they fail per item if wrong
        pass
    return fn


def custom_grade(fn: Callable, response: str, ref: Reference, spec: RewardSpec) -> Grade:
    """Call a custom reward and turn what it returns into a Grade (TypeError on a bad return)."""
    value = fn(response, ref.as_dict())
    if isinstance(value, bool):
        return Grade("correct" if value else "incorrect")
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return Grade("correct" if value >= spec.correct else "incorrect", score=float(value))
    if isinstance(value, dict) and isinstance(value.get("score"), numbers.Real) \
            and not isinstance(value["score"], bool) and math.isfinite(value["score"]):
        score = float(value["score"])
        correct = value.get("correct", score >= spec.correct)
        if not isinstance(correct, bool):
            raise TypeError(f"custom reward returned 'correct' {correct!r}; expected a bool")
        answer = value.get("answer")
        return Grade("correct" if correct else "incorrect", None if answer is None else str(answer)[:200],
                     score=score)
    raise TypeError(f"custom reward returned {type(value).__name__} {value!r:.80}; expected a finite number, "
                    "a bool or a dict with a finite 'score'")


@dataclass(frozen=True)
class Term:
    """One reward of a plan: a registered kind, or ``custom`` with its target."""

    kind: str
    weight: float = 1.0
    custom: Optional[str] = None

    def needs(self) -> tuple[str, ...]:
        return () if self.kind == CUSTOM else REWARDS.get(self.kind).needs


@dataclass(frozen=True)
class RewardPlan:
    """The terms and context a grading worker runs (sent to it as pickled plain data)."""

    terms: tuple[Term, ...]
    context: Context = field(default_factory=Context)

    def __post_init__(self):
        if not self.terms:
            raise ValueError("reward plan: needs at least one term")
        for i, t in enumerate(self.terms):
            if t.kind == CUSTOM and not t.custom:
                raise ValueError(f"reward term {i}: kind 'custom' needs a target (path/to/file.py:function)")
            if t.kind != CUSTOM:
                REWARDS.get(t.kind)

    def needs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for t in self.terms for n in t.needs()))

    def check(self) -> None:
        """Import every custom reward here (a clear error now, not in a worker later)."""
        for i, t in enumerate(self.terms):
            if t.kind == CUSTOM:
                load_custom(t.custom, "reward.custom" if len(self.terms) == 1 else f"reward.terms[{i}].custom")

    def grader(self) -> Callable[[str, Reference], Grade]:
        """The grading function (imports custom rewards; run it in a worker)."""
        ctx = self.context
        fns = []
        for t in self.terms:
            if t.kind == CUSTOM:
                fn = load_custom(t.custom)
                fns.append(lambda r, ref, _fn=fn: custom_grade(_fn, r, ref, ctx.spec))
            else:
                fns.append(lambda r, ref, _g=REWARDS.get(t.kind).grade: _g(r, ref, ctx))

        def grade(response: str, ref: Reference) -> Grade:
            grades = []
            for t, fn in zip(self.terms, fns):
                try:
                    grades.append(fn(response, ref))
                except Exception as e:  # a crash in a reward is a counted error, never raised
                    return Grade("error", None, f"{t.kind}: {type(e).__name__}: {e}"[:300])
            if len(grades) == 1:
                return grades[0]
            bad = next((g for g in grades if g.status == "error"), None)
            if bad is not None:
                return bad
            score = sum(t.weight * reward_of(g.status, ctx.spec, g.score) for t, g in zip(self.terms, grades))
            return Grade(grades[0].status, grades[0].answer, grades[0].detail, score)

        return grade


def missing_needs(plan: RewardPlan, refs: list[Reference]) -> dict[str, int]:
    """Per needed field, how many of ``refs`` lack it (empty when every reference feeds the plan)."""
    return {need: n for need in plan.needs() if (n := sum(not r.has(need) for r in refs))}


def describe() -> list[tuple[str, str, str]]:
    """(name, needs, help) of every registered reward, for docs and ``--help``."""
    return [(k.name, ", ".join(k.needs) or "-", k.help) for k in map(REWARDS.get, REWARDS.names())]


__all__ = ["CUSTOM", "CUSTOM_SIGNATURE", "Context", "REWARDS", "RewardKind", "RewardPlan", "Term", "custom_grade",
           "describe", "load_custom", "missing_needs", "register_reward"]
