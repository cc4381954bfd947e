"""Code grading: the response's program against the problem's tests, each run in the sandbox.

The program is the last fenced code block of the response (```` ```python ````, ```` ```py ```` or
unlabelled); a response without one is ``no_answer``. Tests (:class:`~.reference.Reference`) are
either stdin/stdout (the stripped output lines must match) or, when the problem names a function,
functional: the program is followed by a small driver that calls ``Solution().<fn>(*args)`` (or a
top-level ``<fn>``) with the JSON arguments of the test's input lines and prints the JSON result,
which must equal the expected JSON value (LiveCodeBench's LeetCode-style tests).

``correct`` means every test passed. Grading stops at the first failure (as LiveCodeBench does),
unless partial credit is on, where the score is the fraction passed mapped onto
[incorrect, correct]. Each run is a fresh bubblewrap sandbox with its own limits
(:mod:`.code_sandbox`); the pool's per-item timeout bounds the whole problem.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from megatron_skpo.rewards.code_sandbox import SandboxLimits, run_program
from megatron_skpo.rewards.grader import Grade, RewardSpec
from megatron_skpo.rewards.reference import Reference

_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_DRIVER = """

import json as _skpo_json, sys as _skpo_sys
_skpo_args = [_skpo_json.loads(_l) for _l in _skpo_sys.stdin.read().splitlines() if _l.strip()]
_skpo_fn = getattr(Solution(), {fn!r}) if "Solution" in globals() else globals()[{fn!r}]
print(_skpo_json.dumps(_skpo_fn(*_skpo_args)))
"""


@dataclass(frozen=True)
class CodeOptions:
    """How code is run and scored (``reward.code`` in the config)."""

    limits: SandboxLimits = SandboxLimits()
    partial_credit: bool = False


def extract_code(response: str) -> Optional[str]:
    """The last fenced Python (or unlabelled) code block, or None."""
    blocks = [body for lang, body in _FENCE.findall(response) if body.strip()]
    return blocks[-1] if blocks else None


def _json_equal(actual: str, expected: str) -> bool:
    try:
        return json.loads(actual.strip()) == json.loads(expected.strip())
    except ValueError:
        return False


def _stdout_equal(actual: str, expected: str) -> bool:
    norm = lambda s: [line.rstrip() for line in s.strip().splitlines()]  # noqa: E731
    return norm(actual) == norm(expected)


def _passes(program: str, test: Any, functional: bool, limits: SandboxLimits) -> bool:
    result = run_program(program, test["input"], limits)
    if result.returncode != 0:
        return False
    return (_json_equal if functional else _stdout_equal)(result.stdout, test["output"])


def grade_code(response: str, ref: Reference, spec: RewardSpec, options: CodeOptions = CodeOptions()) -> Grade:
    """Run the response's program on ``ref.tests``; ``correct`` when all pass."""
    if not ref.tests:
        raise ValueError("code reward: the problem has no tests")
    source = extract_code(response)
    if source is None:
        return Grade("no_answer")
    functional = bool(ref.fn_name)
    program = source + _DRIVER.format(fn=ref.fn_name) if functional else source
    passed = 0
    for test in ref.tests:
        if _passes(program, test, functional, options.limits):
            passed += 1
        elif not options.partial_credit:
            break
    n = len(ref.tests)
    status = "correct" if passed == n else "incorrect"
    score = spec.incorrect + (spec.correct - spec.incorrect) * passed / n if options.partial_credit else None
    answer = f"{passed}/{n} tests passed" if options.partial_credit or passed == n else f"failed test {passed + 1}/{n}"
    return Grade(status, answer, score=score)
