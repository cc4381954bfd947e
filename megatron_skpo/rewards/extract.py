"""Final-answer extraction from a model response, and the normalisation we apply before math-verify.

Extraction is ours, not math-verify's: math-verify's ``parse`` on a whole response matches the
first or any LaTeX expression it likes, while RLVR convention (DAPO, SKPO) grades the *last*
``\\boxed{}``. Extractors are registered by name; each returns the answer and where it was
stated:

- ``boxed``: the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced nested braces (or
  ``\\boxed 5``); an unbalanced last box falls back to the previous balanced one.
- ``the_answer_is``: the text after the last "the (final) answer is" up to the end of its sentence;
  an answer in inline maths followed by words (``$3$ dollars``) is the maths.
- ``last_number``: the last integer, decimal or a/b fraction in the response.

The final stated answer wins: of the configured extractors that read a *stated* answer
(``boxed``, ``the_answer_is``), the one whose answer starts last in the response is used, so
"\\boxed{3} ... Wait, that's wrong. The answer is 5." grades 5, and "The answer is \\boxed{5}"
grades the box. A "the answer is" followed by words only ("the answer is correct") never
overrides another stated answer: after a box that is commentary, not a retraction. Extractors
that *guess* (``last_number``, :data:`GUESSING`) apply only when no stated answer is found, in the
configured order.

All scans are linear in the response length, so 1 MB of text costs milliseconds.
"""
from __future__ import annotations

import re
from typing import Callable, NamedTuple, Optional, Sequence

from megatron_skpo.registry import Registry


class Found(NamedTuple):
    """An extracted answer and where the response states it (``at``: its offset; -1 for a stated
    answer that never overrides another one, see ``the_answer_is``)."""

    at: int
    answer: str


EXTRACTORS: Registry[Callable[[str], Optional[Found]]] = Registry("answer extractor")
GUESSING = frozenset({"last_number"})  # extractors used only when no stated answer is found

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_IS_RE = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:(?:,|\\,)\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
# Longest answer we hand to math-verify: a real final answer is short; a 100 KB "answer" is noise
# that would only burn the grading timeout. A plain number is kept whole however long (the grader
# compares long numbers exactly itself, in linear time: grader._long_numbers_match).
MAX_ANSWER_CHARS = 1000
PLAIN_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def _braced(text: str, start: int) -> Optional[str]:
    """Content of the brace group opening at ``text[start] == '{'``; None if unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{" and text[i - 1] != "\\":
            depth += 1
        elif c == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


@EXTRACTORS.register("boxed")
def _boxed_found(text: str) -> Optional[Found]:
    for m in reversed(list(_BOX_RE.finditer(text))):
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            inner = _braced(text, j)
            if inner is not None:
                return Found(m.start(), inner.strip())
        elif j > m.end():  # "\boxed 5": the token up to the next space or $
            token = re.match(r"[^\s$]+", text[j:])
            if token:
                return Found(m.start(), token.group(0))
    return None


# "$3$ dollars", "\(3\) apples": the maths, then words only (a unit, a noun).
_MATH_THEN_WORDS_RE = re.compile(r"^(?:\$([^$]+)\$|\\\((.+?)\\\))\s+[A-Za-z][A-Za-z ]*$")
_WORDS_ONLY_RE = re.compile(r"^[A-Za-z][A-Za-z ']*$")


@EXTRACTORS.register("the_answer_is")
def _answer_is_found(text: str) -> Optional[Found]:
    last = None
    for last in _ANSWER_IS_RE.finditer(text):
        pass
    if last is None:
        return None
    ans = text[last.end() :].split("\n", 1)[0]
    # End of sentence: a period/;/!/? before a space or the end (not the point of 3.5), or a comma
    # that starts a clause ("18, so she ...").
    ans = re.split(r"[.;!?](?=\s|$)|,\s+(?=[A-Za-z])", ans, maxsplit=1)[0].strip()
    math = _MATH_THEN_WORDS_RE.match(ans)
    if math:
        ans = math.group(1) or math.group(2)
    ans = ans.strip().strip("$ *").strip()
    if not ans:
        return None
    # Words alone after an earlier box are commentary ("the answer is correct"), not a retraction.
    return Found(-1 if _WORDS_ONLY_RE.match(ans) else last.start(), ans)


@EXTRACTORS.register("last_number")
def _last_number_found(text: str) -> Optional[Found]:
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    return Found(last.start(), last.group(0)) if last else None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last balanced ``\\boxed{...}`` (or ``\\boxed x``) in ``text``."""
    found = _boxed_found(text)
    return found.answer if found else None


def answer_is(text: str) -> Optional[str]:
    """Text after the last "the answer is", up to the end of its sentence, without $ and period."""
    found = _answer_is_found(text)
    return found.answer if found else None


def last_number(text: str) -> Optional[str]:
    """The last number (integer, decimal with optional thousands commas, or a/b) in ``text``."""
    found = _last_number_found(text)
    return found.answer if found else None


def _found(name: str, text: str) -> Optional[Found]:
    found = EXTRACTORS.get(name)(text)
    return found if found and found.answer else None


def extract_answer(text: str, order: Sequence[str] = ("boxed", "the_answer_is")) -> Optional[str]:
    """The final stated answer among the extractors in ``order`` (the one stated last in ``text``);
    if none states one, the first guessing extractor's answer; None when nothing applies."""
    stated = [found for name in order if name not in GUESSING and (found := _found(name, text))]
    if stated:
        ans = max(stated, key=lambda f: f.at).answer
    else:
        ans = next((found.answer for name in order if name in GUESSING and (found := _found(name, text))), None)
    if ans is None:
        return None
    return ans[:MAX_ANSWER_CHARS] if len(ans) > MAX_ANSWER_CHARS and not PLAIN_NUMBER.fullmatch(ans) else ans


_DIGIT_GROUP_SPACE_RE = re.compile(r"(?<=\d)(?:\\[,;:! ]|~)(?=\d{3}(?!\d))")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_MC_RE = re.compile(r"^\(?([A-E])\)?$")
_NUMBER_WORDS_RE = re.compile(r"^(-?\d[\d,]*(?:\.\d+)?)\s+[A-Za-z][A-Za-z ]*$")
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen twenty").split()
NUMBER_WORDS = {w: str(i) for i, w in enumerate(_WORDS)}


def normalize_answer(ans: str) -> str:
    """Fix the forms math-verify grades wrongly, before it parses them (cases in tests/rewards/).

    - a trailing sentence period or comma (``2.``): math-verify reads ``2.`` as an unparsable string;
    - ``1{,}000`` -> ``1,000`` (math-verify reads thousands commas itself);
    - ``1\\,000``, ``1\\;000``, ``1~000`` -> ``1000``: LaTeX spaces between digit groups, which
      math-verify reads as a product (1 x 000 = 0);
    - ``\\text{(B)}``, ``(B)`` -> ``B``: multiple-choice letters;
    - a number word up to twenty (``six``) -> ``6``: math-verify reads ``six`` as s*i*x;
    - a plain number followed by words (``12 dollars``) -> ``12``: math-verify reads the words as
      a product of symbols, 12*d*o*l*l*a*r*s.
    """
    a = ans.strip().replace("{,}", ",")
    a = _DIGIT_GROUP_SPACE_RE.sub("", a)
    a = re.sub(r"(?<=[^.])[.,;]+$", "", a).strip()
    plain = _TEXT_WRAP_RE.sub(r"\1", a).strip()
    mc = _MC_RE.match(plain)
    if mc:
        return mc.group(1)
    word = NUMBER_WORDS.get(plain.lower().strip())
    if word is not None:
        return word
    unit = _NUMBER_WORDS_RE.match(a)
    return unit.group(1) if unit else a
