"""The maths of the model-based analyses (docs/algorithm.md §7): pure functions on tensors.

Answers are compared as integer codes: :class:`AnswerCodes` maps each canonical final answer
(:func:`answer_key`) to an id shared by every condition of an analysis, and :data:`NO_ANSWER`
(-1) marks a response with no extractable answer. A group is one row of G responses: ``ids``
[N, G] long, ``correct`` [N, G] bool.

- :func:`distinct_answers`: distinct final answers per group (no-answer responses not counted);
- :func:`all_same_outcome`: groups whose G outcomes are all correct or all incorrect (their
  group-relative advantages are all exactly 0: the zero-advantage rate is the mean of this);
- :func:`modal_answer`: the most frequent answer of each group (ties: the one sampled first);
- :func:`bypass`: per group, the fraction of responses whose answer differs from a reference
  answer (the shortcut analysis's bypass rate, with the hard-prefix group's modal answer as the
  reference);
- :func:`relative_positions`, :func:`cut_position`: where responses are cut;
- :func:`implicit_advantage`: success rates of several runs normalised across runs at the same
  problem and position.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
from torch import Tensor

from megatron_skpo.analysis.sign_consistency import group_normalize
from megatron_skpo.rewards.extract import normalize_answer

NO_ANSWER = -1
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")


def answer_key(answer: Optional[str]) -> Optional[str]:
    """The canonical form two final answers are compared in (None: no answer).

    ``normalize_answer`` (trailing period, number words, units after a number, ...), then
    thousands commas and surrounding ``$`` removed; a plain number is written as a number
    (``8.0`` -> ``8``, ``+3`` -> ``3``, ``0.50`` -> ``0.5``; ``a/b`` fractions unchanged). Other
    text is compared as written (whitespace collapsed).
    """
    if answer is None:
        return None
    a = normalize_answer(answer).strip().strip("$").strip()
    plain = a.replace(",", "") if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", a) else a
    if _NUMBER.match(plain):
        value = float(plain)
        if math.isfinite(value):
            return str(int(value)) if value.is_integer() else repr(value)
    key = re.sub(r"\s+", " ", plain).strip()
    return key or None


class AnswerCodes:
    """Canonical answers -> integer ids (first seen, first id); None -> :data:`NO_ANSWER`."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, answers: Sequence[Optional[str]]) -> list[int]:
        out = []
        for a in answers:
            key = answer_key(a)
            out.append(NO_ANSWER if key is None else self.ids.setdefault(key, len(self.ids)))
        return out


def _check_groups(name: str, x: Tensor) -> None:
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"{name}: expected [N, G] with G >= 1, got shape {tuple(x.shape)}")


def distinct_answers(ids: Tensor) -> Tensor:
    """[N] long: distinct answer ids per row of ``ids`` [N, G], :data:`NO_ANSWER` not counted."""
    _check_groups("distinct_answers", ids)
    s, _ = ids.sort(dim=1)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    return (new & (s != NO_ANSWER)).sum(dim=1)


def all_same_outcome(correct: Tensor) -> Tensor:
    """[N] bool: every response of the row correct, or every one incorrect (zero advantage)."""
    _check_groups("all_same_outcome", correct)
    c = correct.bool()
    return c.all(dim=1) | (~c).all(dim=1)


def modal_answer(ids: Tensor) -> Tensor:
    """[N] long: the most frequent answer id of each row (no-answer responses not counted); a tie
    goes to the answer sampled first; :data:`NO_ANSWER` where the row has no answer at all."""
    _check_groups("modal_answer", ids)
    valid = ids != NO_ANSWER
    counts = ((ids[:, :, None] == ids[:, None, :]) & valid[:, None, :]).sum(dim=2)  # [N, G]
    counts = torch.where(valid, counts, torch.full_like(counts, -1))
    first = counts.argmax(dim=1)  # argmax returns the first maximal index: the earliest sample wins ties
    return torch.where(valid.any(dim=1), ids.gather(1, first[:, None])[:, 0], torch.full_like(first, NO_ANSWER))


def bypass(ids: Tensor, reference: Tensor) -> Tensor:
    """[N] float: the fraction of each row's responses whose answer differs from ``reference`` [N].

    A response without an answer counts as differing (it does not reach the reference answer).
    Rows whose reference is :data:`NO_ANSWER` have no answer to bypass: NaN.
    """
    _check_groups("bypass", ids)
    if reference.shape != ids.shape[:1]:
        raise ValueError(f"bypass: reference must be [N]={ids.shape[0]}, got {tuple(reference.shape)}")
    differ = (ids != reference[:, None]).to(torch.float64).mean(dim=1)
    return torch.where(reference == NO_ANSWER, torch.full_like(differ, float("nan")), differ)


def relative_positions(n: int, lo: float = 1 / 6, hi: float = 1 / 2) -> list[float]:
    """``n`` evenly spaced fractions from ``lo`` to ``hi`` inclusive (one: ``lo``)."""
    if n < 1 or not 0 <= lo <= hi <= 1:
        raise ValueError(f"relative_positions: need n >= 1 and 0 <= lo <= hi <= 1, got n={n}, lo={lo}, hi={hi}")
    return [lo] if n == 1 else [lo + (hi - lo) * j / (n - 1) for j in range(n)]


def cut_position(length: int, frac: float, lo: int = 0, hi: Optional[int] = None) -> int:
    """Prefix length of a ``length``-token response at ``frac``: frac * length rounded half up,
    clamped to [lo, hi] (default hi: length - 1, a strict prefix)."""
    hi = length - 1 if hi is None else hi
    if length < 1 or lo > hi:
        raise ValueError(f"cut_position: no prefix length in [{lo}, {hi}] for a {length}-token response")
    return max(lo, min(hi, math.floor(frac * length + 0.5)))


def skpo_cut(length: int, frac: float) -> int:
    """The cut at ``frac`` kept inside SKPO's split interval [ceil(L/6), floor(L/2)] (at least 1);
    needs L >= 2."""
    return cut_position(length, frac, lo=max(1, math.ceil(length / 6)), hi=length // 2)


def implicit_advantage(rates: Tensor, present: Tensor, eps: float = 1e-6) -> Tensor:
    """(R - mean) / std across runs, per problem and position.

    rates: [R, P, M] success rate of run r's prefixes of problem p at position m (the run's mean
    over its kept responses); present: [R, P] bool, whether run r has a kept response of problem p.
    Returns [R, P, M]: ``group_normalize`` over the runs present (Bessel std, a constant column is
    0); NaN where the run is absent or fewer than two runs are present for the problem.
    """
    if rates.dim() != 3 or present.shape != rates.shape[:2]:
        raise ValueError(f"implicit_advantage: rates must be [R, P, M] and present [R, P], got "
                         f"{tuple(rates.shape)} and {tuple(present.shape)}")
    out = torch.full_like(rates, float("nan"), dtype=torch.float64)
    for p in range(rates.shape[1]):
        runs = present[:, p].nonzero()[:, 0]
        if runs.numel() >= 2:
            out[runs, p, :] = group_normalize(rates[runs, p, :].to(torch.float64).t(), eps).t()
    return out


def nanmean(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(mean over ``dim`` ignoring NaN -- NaN where all are NaN, count of non-NaN entries)."""
    valid = ~torch.isnan(x)
    n = valid.sum(dim=dim)
    total = torch.where(valid, x, torch.zeros_like(x)).sum(dim=dim)
    return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan"))), n
