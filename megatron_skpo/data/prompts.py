"""Prompt rendering: a named template, then (optionally) the tokenizer's chat template.

Named templates:
- ``qwen_math``: the problem followed by Qwen2.5-Math's chain-of-thought instruction "Please
  reason step by step, and put your final answer within \\boxed{}." (we put it in the user turn,
  as SimpleRL-Zoo and Dr. GRPO do, rather than in a system turn);
- ``fewshot_plain``: four plain-text Question/Answer shots ending in "The answer is N.", then
  ``Question: {problem}\\nAnswer:``; a completion prompt, never wrapped in a chat template (a
  format small models such as SmolLM2-135M can learn on CPU); grade it with the
  ``the_answer_is`` / ``last_number`` extractors;
- ``raw``: the problem text unchanged;
- ``code``: a programming problem followed by an instruction to answer with one complete Python
  program in a fenced ```` ```python ```` block that reads stdin and writes stdout (the code reward
  grades the last such block; LiveCodeBench's own prompt asks the same);
- ``multiple_choice``: the question and its lettered options (rendered by the loader), then "put
  the letter of your answer within \\boxed{}" (MMLU-Pro).
Any other string containing ``{problem}`` is used as a format string.

Problems whose prompt is already a list of chat messages (dapo-math-17k) are rendered with the
chat template as they are; the named template does not apply to them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_skpo.data.loaders import DataError, LoadReport, Problem

QWEN_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

FEWSHOT_PLAIN_SHOTS = (
    "Question: Tom has 3 apples. He buys 5 more apples. How many apples does Tom have now?\n"
    "Answer: 3 + 5 = 8. The answer is 8.\n\n"
    "Question: There are 9 birds on a tree. 4 birds fly away. How many birds are left on the tree?\n"
    "Answer: 9 - 4 = 5. The answer is 5.\n\n"
    "Question: Sara has 3 bags with 4 marbles in each bag. How many marbles does Sara have?\n"
    "Answer: 3 * 4 = 12. The answer is 12.\n\n"
    "Question: 12 cookies are shared equally among 3 children. How many cookies does each child get?\n"
    "Answer: 12 / 3 = 4. The answer is 4.\n\n"
)

CODE_INSTRUCTION = ("Write a complete Python 3 program that solves the problem: read the input from standard input "
                    "and write the answer to standard output (if the problem gives a function signature, define "
                    "that function instead). Reason first if you need to, then give the final program in one "
                    "```python code block.")
CHOICE_INSTRUCTION = "Please reason step by step, and put the letter of your answer within \\boxed{}."


# SKPO's skip content in a chat turn's problem slot (docs/algorithm.md §2 step 4): segment first.
CHAT_SKIP = "Partial reasoning:\n{segment}\n\nProblem:\n{problem}"
# ... and in the few-shot completion prompt's last "Question:" block: the segment as a draft, then the
# problem. Chosen by `skpo-analyze shortcut` on SmolLM2-135M + MAWPS-easy among six texts (README,
# Results): the downstream keeps 0.87x q's accuracy and its zero-advantage rate is 0.07 above q's.
FEWSHOT_SKIP = "(draft:{segment})\n{problem}"
# Critique-GRPO's refinement request (ours: the paper's asks the same in its own words): the problem,
# the response and its critique, then a request to answer again; in the few-shot prompt, the
# previous answer and the critique follow the question.
CHAT_REFINE = ("Problem:\n{problem}\n\nA previous solution:\n{response}\n\nCritique: {critique}\n\n"
               "Solve the problem again, taking the critique into account.")
FEWSHOT_REFINE = "{problem}\n(previous answer:{response}\n{critique} Answer again.)"


@dataclass(frozen=True)
class Template:
    text: str  # format string with {problem}
    chat: bool  # may be wrapped in the tokenizer's chat template
    stop: tuple[str, ...] = ()  # generation stop strings (few-shot: do not write the next question)
    extractors: tuple[str, ...] = ("boxed", "the_answer_is")  # answer extraction that fits the format
    skip: str = CHAT_SKIP  # SKPO's skip content for the problem slot, with {segment} and {problem}
    refine: str = CHAT_REFINE  # Critique-GRPO's refinement request, with {problem}, {response}, {critique}


TEMPLATES = {
    "qwen_math": Template("{problem}\n" + QWEN_MATH_INSTRUCTION, chat=True),
    "fewshot_plain": Template(FEWSHOT_PLAIN_SHOTS + "Question: {problem}\nAnswer:", chat=False,
                              stop=("\nQuestion:", "\n\n"), extractors=("the_answer_is", "last_number"),
                              skip=FEWSHOT_SKIP, refine=FEWSHOT_REFINE),
    "raw": Template("{problem}", chat=True),
    "code": Template("{problem}\n" + CODE_INSTRUCTION, chat=True, extractors=()),
    "multiple_choice": Template("{problem}\n" + CHOICE_INSTRUCTION, chat=True),
}


def get_template(name_or_format: str) -> Template:
    if name_or_format in TEMPLATES:
        return TEMPLATES[name_or_format]
    if "{problem}" in name_or_format:
        return Template(name_or_format, chat=True)
    raise ValueError(f"prompt_template: got {name_or_format!r}; use one of {', '.join(TEMPLATES)} "
                     "or a format string containing {problem}")


@dataclass(frozen=True)
class PromptSlot:
    """How one problem's prompt is rendered, with any content in its *problem slot*: the
    ``{problem}`` of the template, or the last user message of dataset chat messages. The problem
    itself renders the prompt; SKPO renders its skip content [s, q] in the same slot, so the
    downstream is asked in the format of the task."""

    template: Template
    use_chat: bool
    messages: Optional[tuple] = None  # dataset chat messages ({role, content} dicts)

    @classmethod
    def of(cls, problem: Problem, template: str, use_chat_template: bool) -> "PromptSlot":
        msgs = tuple(dict(m) for m in problem.prompt) if isinstance(problem.prompt, list) else None
        if msgs is not None and not any(m["role"] == "user" for m in msgs):
            raise ValueError(f"{problem.uid}: chat messages without a user message have no problem slot")
        return cls(get_template(template), use_chat_template, msgs)

    @property
    def chat_rendered(self) -> bool:
        """The text comes from the tokenizer's chat template (which writes its special tokens)."""
        return self.messages is not None or (self.use_chat and self.template.chat)

    @property
    def add_special_tokens(self) -> bool:
        """Whether encoding the rendered text adds the tokenizer's special tokens (e.g. BOS)."""
        return not self.chat_rendered

    def content(self, problem: Problem) -> str:
        """What the problem puts in the slot: the problem text, or the last user message's content."""
        if self.messages is None:
            return str(problem.prompt)
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    def text(self, content: str, tokenizer: Any = None, uid: str = "prompt") -> str:
        """The prompt text with ``content`` in the problem slot."""
        if self.messages is not None:
            last = max(i for i, m in enumerate(self.messages) if m["role"] == "user")
            messages = [dict(m, content=content) if i == last else dict(m) for i, m in enumerate(self.messages)]
        else:
            body = self.template.text.replace("{problem}", content)  # not str.format: LaTeX is full of braces
            if not self.chat_rendered:
                return body
            messages = [{"role": "user", "content": body}]
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{uid}: a chat template is needed but the tokenizer has none "
                             "(set use_chat_template: false or use a completion template)")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render(problem: Problem, template: str = "qwen_math", tokenizer: Any = None,
           use_chat_template: bool = True) -> str:
    """Prompt text of ``problem``; the chat template applies when asked for and allowed."""
    slot = PromptSlot.of(problem, template, use_chat_template)
    return slot.text(slot.content(problem), tokenizer, problem.uid)


def render_all(problems: Sequence[Problem], template: str, tokenizer: Any, use_chat_template: bool,
               max_tokens: Optional[int] = None, policy: str = "error",
               report: Optional[LoadReport] = None) -> tuple[list[Problem], list[str], int]:
    """Render every problem; those over ``max_tokens`` raise a DataError (file, row) or are skipped.

    Returns the kept problems, their prompts, and how many were skipped for length. With the
    ``report`` of the load, each skipped prompt is also counted there (reason ``too_long``, by
    file, with its row) and leaves ``report.kept``, so one report covers every dropped row.
    """
    kept, prompts, skipped = [], [], 0
    for p in problems:
        text = render(p, template, tokenizer, use_chat_template)
        if max_tokens is not None and tokenizer is not None:
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > max_tokens:
                error = DataError(p.source, p.row, f"prompt has {n} tokens > limit {max_tokens}", "too_long")
                if policy == "error":
                    raise error
                skipped += 1
                if report is not None:
                    report.skip(error)
                    report.kept -= 1
                continue
        kept.append(p)
        prompts.append(text)
    return kept, prompts, skipped


def render_user_turn(tokenizer: Any, user: str) -> tuple[str, bool]:
    """The text of a one-user-turn conversation plus the generation prompt (a prompt without a slot).

    Returns (text, add_special_tokens): whether encoding the text should add the tokenizer's special
    tokens: only for the plain "{user}\\n" fallback of a tokenizer without a chat template, whose
    special tokens (e.g. BOS) no template writes.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, False
    return f"{user}\n", True
