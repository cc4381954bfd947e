"""Multiple-choice grading (MMLU-Pro): the chosen option letter against the gold letter.

The chosen letter is, in order: the last ``\\boxed{...}`` (a letter, ``(B)``, ``B.`` or an option's
own text), else the last "answer is (B)" / "Answer: B" (MMLU-Pro's own extraction pattern). A
response that names no option is ``no_answer``. Options are lettered ``A``.. in order; a letter past
the last option is incorrect, not a match.
"""
from __future__ import annotations

import re
import string
from typing import Optional, Sequence

from megatron_skpo.rewards.extract import last_boxed
from megatron_skpo.rewards.grader import Grade
from megatron_skpo.rewards.reference import Reference

LETTERS = string.ascii_uppercase[:26]
_ANSWER_IS = re.compile(r"(?:answer is|answer:)\s*\(?\s*([A-Z])\s*\)?(?![A-Za-z])", re.IGNORECASE)
_LETTER = re.compile(r"^\(?\s*([A-Z])\s*\)?\s*[.:)]?$")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf)\s*\{([^{}]*)\}")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", _TEXT.sub(r"\1", text)).strip().strip(".").strip().lower()


def choice_letter(text: str, choices: Sequence[str] = ()) -> Optional[str]:
    """The option letter ``text`` names (a bare letter, ``(B)``, ``B.`` or an option's text)."""
    inner = _TEXT.sub(r"\1", text).strip()
    m = _LETTER.match(inner)
    if m:
        return m.group(1)
    if choices:
        by_text = {_norm(c): LETTERS[i] for i, c in enumerate(choices)}
        return by_text.get(_norm(inner))
    return None


def extract_choice(response: str, choices: Sequence[str] = ()) -> Optional[str]:
    """The letter the response chose, or None."""
    boxed = last_boxed(response)
    if boxed is not None:
        letter = choice_letter(boxed, choices)
        if letter is not None:
            return letter
    found = _ANSWER_IS.findall(response)
    return found[-1].upper() if found else None


def grade_choice(response: str, ref: Reference) -> Grade:
    """``correct`` when the chosen letter is the gold letter (``ref.answer``)."""
    gold = ref.answer.strip().upper()
    if len(gold) != 1 or gold not in LETTERS or (ref.choices and LETTERS.index(gold) >= len(ref.choices)):
        raise ValueError(f"multiple choice: the gold answer must be an option letter, got {ref.answer!r}")
    letter = extract_choice(response, ref.choices)
    if letter is None:
        return Grade("no_answer")
    return Grade("correct" if letter == gold else "incorrect", letter)
