"""What a reward grades a response against: :class:`Reference` (gold answer, tests, choices, extras).

A reference is built from a dataset row by the loader (``Problem.answer`` and ``Problem.meta``) and
travels to the grading workers as plain data, so it holds only strings, numbers, lists and dicts.

- ``answer``: the gold final answer (math), or the gold option letter ``A``..``J`` (multiple choice);
  empty for code problems, which are graded by ``tests``.
- ``tests``: code test cases ``{"input": str, "output": str}``. With ``fn_name`` unset, ``input`` is
  the program's stdin and ``output`` the expected stdout. With ``fn_name`` set (LeetCode-style
  "functional" tests, as LiveCodeBench has them), ``input`` holds one JSON value per line (the
  call's arguments) and ``output`` the JSON of the return value.
- ``choices``: multiple-choice option texts, in letter order (``choices[0]`` is option A).
- ``extra``: other fields of the row (``data.*.extra_fields``), for custom rewards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

META_KEYS = ("tests", "fn_name", "choices", "extra")


@dataclass(frozen=True)
class Reference:
    answer: str = ""
    tests: tuple[Mapping[str, str], ...] = ()
    fn_name: Optional[str] = None
    choices: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, answer: str, meta: Optional[Mapping[str, Any]] = None) -> "Reference":
        """The reference of a loaded problem (``Problem.answer``, ``Problem.meta``)."""
        meta = meta or {}
        return cls(answer, tuple(meta.get("tests", ())), meta.get("fn_name"), tuple(meta.get("choices", ())),
                   dict(meta.get("extra", {})))

    def as_dict(self) -> dict[str, Any]:
        """What a custom reward receives: ``{"answer", "tests", "fn_name", "choices", **extra}``."""
        return {**self.extra, "answer": self.answer, "tests": [dict(t) for t in self.tests],
                "fn_name": self.fn_name, "choices": list(self.choices)}

    def has(self, need: str) -> bool:
        """Whether this reference can feed a reward that needs ``need`` (answer, tests or choices)."""
        return bool(getattr(self, need))
