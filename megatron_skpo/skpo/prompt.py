"""The skip-prompt builder (docs/algorithm.md §2 step 4): the downstream prompt q~ = [s, q].

Modes:
- ``skip`` (the paper's; the text is ours): the skip content, the skip template filled with the
  selected segment s and the problem q (default for chat turns
  "Partial reasoning:\\n{segment}\\n\\nProblem:\\n{problem}"), goes into the *problem slot of the
  prompt the task uses* (:class:`~megatron_skpo.data.prompts.PromptSlot`): the chat turn with the
  task's own instruction, the few-shot prompt's last question block, or the last user message of
  dataset chat messages. So the downstream is asked in the format the model answers in. The model
  may use the partial reasoning or ignore it. The segment text is re-tokenized inside the prompt
  (its ids differ from the sampled ones at the boundaries).
- ``hard_prefix`` (the "w/o skip" ablation): the prompt of q as it was sampled, continued with the
  segment's sampled TOKEN IDS unchanged, so the downstream continues exactly the upstream sequence.

A prompt without a slot (``slot=None``) is a chat user turn holding the content alone.

Template placeholders are exactly ``{segment}`` and ``{problem}``, substituted in one pass: every
other brace is literal (so "\\boxed{}" in a template works), and braces or placeholder-like text
inside a segment or problem are never substituted again (str.format would break on both).

Without a chat template (a base model's tokenizer) the user text is rendered as "{user}\\n" and
encoded with the tokenizer's special tokens (e.g. BOS); with one, the chat template's text is
encoded without adding special tokens, because the template writes them itself.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from transformers import PreTrainedTokenizerBase

from megatron_skpo.data.prompts import CHAT_SKIP, PromptSlot, render_user_turn

DEFAULT_TEMPLATE = CHAT_SKIP
SkipMode = Literal["skip", "hard_prefix"]
_PLACEHOLDER = re.compile(r"\{(segment|problem)\}")


@dataclass
class DownstreamPrompt:
    """A rendered downstream prompt."""

    token_ids: list[int]  # [L] the prompt the downstream group is sampled from
    text: str  # the prompt as text (hard_prefix: chat text + the segment's decoded text)
    segment_span: tuple[int, int]  # [start, end) token positions in token_ids covering the segment
    mode: str


def fill_template(template: str, segment: str, problem: str) -> tuple[str, tuple[int, int]]:
    """Render ``template``; returns the text and the [start, end) character span of the segment."""
    if len(re.findall(r"\{segment\}", template)) != 1 or len(re.findall(r"\{problem\}", template)) != 1:
        raise ValueError(f"skip template must contain {{segment}} and {{problem}} exactly once: {template!r}")
    parts: list[str] = []
    pos, span = 0, (0, 0)
    for match in _PLACEHOLDER.finditer(template):
        parts.append(template[pos : match.start()])
        value = segment if match.group(1) == "segment" else problem
        start = sum(len(p) for p in parts)
        if match.group(1) == "segment":
            span = (start, start + len(value))
        parts.append(value)
        pos = match.end()
    parts.append(template[pos:])
    return "".join(parts), span


def _token_span(offsets: Sequence[tuple[int, int]], char_span: tuple[int, int]) -> tuple[int, int]:
    """The tokens whose characters overlap ``char_span`` (zero-width special tokens excluded)."""
    cs, ce = char_span
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < ce and e > cs]
    if not hits:
        raise ValueError(f"no prompt token covers the segment characters {char_span}")
    return hits[0], hits[-1] + 1


def _build_skip(problem: str, segment_text: str, tokenizer: PreTrainedTokenizerBase, template: str,
                slot: Optional[PromptSlot]) -> DownstreamPrompt:
    user, (cs, ce) = fill_template(template, segment_text, problem)
    if slot is None:
        text, special = render_user_turn(tokenizer, user)
    else:
        text, special = slot.text(user, tokenizer), slot.add_special_tokens
    where = text.find(user)
    if where < 0:  # templates that trim the message: locate the stripped text instead
        stripped = user.strip()
        found = text.find(stripped) if stripped else -1
        if found < 0:
            raise ValueError("the chat template altered the user message; cannot locate the segment in it")
        where = found - (len(user) - len(user.lstrip()))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the skip-prompt builder needs a fast tokenizer (offset mapping) to locate the segment")
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    span = _token_span(enc["offset_mapping"], (where + cs, where + ce)) if ce > cs else (0, 0)
    return DownstreamPrompt(token_ids=list(enc["input_ids"]), text=text, segment_span=span, mode="skip")


def _build_hard_prefix(
    problem: str, segment_ids: Sequence[int], segment_text: str, tokenizer: PreTrainedTokenizerBase,
    slot: Optional[PromptSlot], prompt_ids: Optional[Sequence[int]]
) -> DownstreamPrompt:
    if slot is None:
        text, special = render_user_turn(tokenizer, problem)
    else:
        text, special = slot.text(problem, tokenizer), slot.add_special_tokens
    ids = list(prompt_ids) if prompt_ids is not None else list(tokenizer(text, add_special_tokens=special)["input_ids"])
    span = (len(ids), len(ids) + len(segment_ids))
    return DownstreamPrompt(
        token_ids=ids + [int(t) for t in segment_ids], text=text + segment_text, segment_span=span, mode="hard_prefix"
    )


def build_downstream_prompt(
    problem: str,
    segment_ids: Sequence[int],
    segment_text: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str = DEFAULT_TEMPLATE,
    mode: SkipMode = "skip",
    slot: Optional[PromptSlot] = None,
    prompt_ids: Optional[Sequence[int]] = None,
) -> DownstreamPrompt:
    """Build the downstream prompt from the problem and the selected upstream segment.

    Args:
        problem: the problem slot's content q (the problem text, or the last user message).
        segment_ids: [|s|] the selected segment's sampled token ids.
        segment_text: the same segment decoded to text.
        tokenizer: the policy's HF tokenizer (fast; its chat template if it has one).
        template: the skip content (``skip`` mode), with {segment} and {problem}.
        mode: ``skip`` or ``hard_prefix``.
        slot: how q's prompt is rendered (None: a chat user turn holding the content alone).
        prompt_ids: [P] q's prompt as sampled (``hard_prefix`` continues exactly these ids).
    """
    if mode == "skip":
        return _build_skip(problem, segment_text, tokenizer, template, slot)
    if mode == "hard_prefix":
        return _build_hard_prefix(problem, segment_ids, segment_text, tokenizer, slot, prompt_ids)
    raise ValueError(f"unknown skip mode {mode!r}; allowed: 'skip', 'hard_prefix'")
