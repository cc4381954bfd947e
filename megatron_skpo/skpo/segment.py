"""SKPO segment selection (docs/algorithm.md §2 step 3): keep one of the G upstream segments by mean NLL.

For each candidate segment s_k, d(s_k) = mean over its tokens of -log pi(s_t | q, s_<t), computed from
the sampler's own log-probs. The paper keeps the segment whose d is closest to the median of the G
values; ``min``, ``max``, ``random`` and ``minmax_alternating`` are ablations.

Median (ours, precise): the true median, i.e. the middle value for odd G and the mean of the two
middle values for even G (not torch.median's lower median). For even G the two middle values are
equidistant from that mean by construction, so the "closest" set is every segment whose d equals one
of the two middle values; we pick the lowest index among them. Selecting by rank like this, instead
of comparing float distances, keeps rounding from deciding the tie. All ties in every selector go
to the lowest index.

An empty segment (no valid token) has d = NaN and is never selected (``random`` skips it too); a
prompt whose segments are all empty is an error naming the prompt.

Selectors are registered in ``SEGMENT_SELECTORS`` as
``fn(nll [P, G], generator: torch.Generator | None, step: int) -> index [P] (int64)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from megatron_skpo.registry import Registry

LogProbs = Union[Tensor, Sequence[Tensor]]
SEGMENT_SELECTORS: Registry = Registry("segment selector")


@dataclass
class SegmentChoice:
    """The selected segment per prompt and the scores it was chosen by."""

    index: Tensor  # [P] int64 (or [] for a single prompt given as [G, T] / a list)
    nll: Tensor  # [P, G] (or [G]) mean NLL per candidate; NaN for empty segments


def _pad(segments: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """A list of G 1-D log-prob tensors -> ([G, T_max], mask [G, T_max])."""
    if any(s.dim() != 1 for s in segments):
        raise ValueError("segment log-probs given as a list must be 1-D tensors")
    if not segments:
        raise ValueError("no candidate segments")
    t_max = max(int(s.numel()) for s in segments)
    logprobs = torch.zeros(len(segments), t_max, dtype=segments[0].dtype, device=segments[0].device)
    mask = torch.zeros(len(segments), t_max, dtype=torch.bool, device=segments[0].device)
    for k, s in enumerate(segments):
        logprobs[k, : s.numel()] = s
        mask[k, : s.numel()] = True
    return logprobs, mask


def segment_nll(logprobs: LogProbs, mask: Optional[Tensor] = None) -> Tensor:
    """Mean negative log-likelihood per segment.

    Args:
        logprobs: [..., G, T] sampler log-probs of the segment tokens, or a list of G 1-D tensors.
        mask: [..., G, T] valid tokens (required for a tensor; a list needs none).
    Returns:
        [..., G] float; NaN where a segment has no valid token.
    """
    if not isinstance(logprobs, Tensor):
        logprobs, mask = _pad(list(logprobs))
    if mask is None or mask.shape != logprobs.shape:
        raise ValueError(f"mask must have the shape of logprobs {tuple(logprobs.shape)}")
    m = mask.bool()
    total = torch.where(m, -logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)).sum(-1)
    n = m.sum(-1)
    return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, float("nan")))


def _first_true(flags: Tensor) -> Tensor:
    """Index of the first True along the last dim (argmax returns the first maximum)."""
    return flags.to(torch.int8).argmax(dim=-1)


@SEGMENT_SELECTORS.register("median")
def select_median(nll: Tensor, generator: Optional[torch.Generator], step: int) -> Tensor:
    """The segment closest to the true median of the valid d values (ties: lowest index)."""
    n_valid = (~nll.isnan()).sum(-1, keepdim=True)
    ordered = nll.sort(dim=-1).values  # NaNs sort last, so ranks 0..n_valid-1 are the valid values
    lower = ordered.gather(-1, (n_valid - 1) // 2)
    upper = ordered.gather(-1, n_valid // 2)
    return _first_true((nll == lower) | (nll == upper))


@SEGMENT_SELECTORS.register("min")
def select_min(nll: Tensor, generator: Optional[torch.Generator], step: int) -> Tensor:
    """The most likely segment (lowest mean NLL)."""
    return nll.nan_to_num(nan=float("inf")).argmin(dim=-1)


@SEGMENT_SELECTORS.register("max")
def select_max(nll: Tensor, generator: Optional[torch.Generator], step: int) -> Tensor:
    """The least likely segment (highest mean NLL)."""
    return nll.nan_to_num(nan=float("-inf")).argmax(dim=-1)


@SEGMENT_SELECTORS.register("random")
def select_random(nll: Tensor, generator: Optional[torch.Generator], step: int) -> Tensor:
    """A uniformly random non-empty segment, drawn from ``generator`` (required, for reproducibility)."""
    if generator is None:
        raise ValueError("segment selector 'random' needs a torch.Generator")
    valid = (~nll.isnan()).to(torch.float32).cpu()
    return torch.multinomial(valid, 1, generator=generator).squeeze(-1).to(nll.device)


@SEGMENT_SELECTORS.register("minmax_alternating")
def select_minmax_alternating(nll: Tensor, generator: Optional[torch.Generator], step: int) -> Tensor:
    """Ablation 'extreme selection': ``min`` at even steps, ``max`` at odd steps."""
    return (select_min if step % 2 == 0 else select_max)(nll, generator, step)


def select_segments(
    logprobs: LogProbs,
    mask: Optional[Tensor] = None,
    selector: str = "median",
    *,
    generator: Optional[torch.Generator] = None,
    step: int = 0,
) -> SegmentChoice:
    """Score the candidate segments of each prompt and select one per prompt.

    Args:
        logprobs: [P, G, T] or [G, T] sampler log-probs, or a list of G 1-D tensors (one prompt).
        mask: valid tokens, same shape as a tensor ``logprobs``.
        selector: a ``SEGMENT_SELECTORS`` name.
        generator: for ``random`` (a CPU generator).
        step: the training step (``minmax_alternating``).
    """
    nll = segment_nll(logprobs, mask)
    flat = nll.reshape(-1, nll.shape[-1])
    empty = flat.isnan().all(dim=-1)
    if bool(empty.any()):
        raise ValueError(f"prompt {int(empty.nonzero()[0])}: every candidate segment is empty")
    index = SEGMENT_SELECTORS.get(selector)(flat, generator, step)
    return SegmentChoice(index=index.reshape(nll.shape[:-1]), nll=nll)
