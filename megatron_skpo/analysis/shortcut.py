"""``skpo-analyze shortcut``: does the model use the skip-connected segment, or bypass it?
(the paper's shortcut validation; definitions in docs/algorithm.md §7).

Per problem, ``base_responses`` responses are sampled from q. Each (its length L in tokens,
a final EOS not counted) is cut at ``positions`` relative positions f evenly spaced in [1/6, 1/2]:
t = round(f L), kept inside SKPO's split interval [ceil(L/6), floor(L/2)] (responses with L < 2
have no such cut and are skipped). For each segment s = the first t tokens, G continuations are
sampled under each condition:

- ``q``: the problem's prompt alone (the unconditional reference, sampled afresh per segment);
- ``hard_prefix``: q's prompt ids followed by the segment's token ids (SKPO's "w/o skip");
- ``skip``: the skip prompt [s, q] from ``build_downstream_prompt(mode="skip")``, the skip text in
  the problem slot of the task's own template (one condition per ``--skip-template``).

With ``downstream_budget="remaining"`` the two segment conditions get max_tokens - t new tokens (so
|s| + |o| <= the cap, as SKPO's downstream); ``full`` gives every condition max_tokens.

Graded text: the continuation for ``q`` and ``skip`` (the segment is in the prompt), the segment
plus its continuation for ``hard_prefix``. Per condition and position (and over all positions):
accuracy, distinct final answers per group, the zero-advantage rate (groups whose G outcomes are
all equal), the no-answer rate, mean generated tokens, and the bypass rate: per segment, the
fraction of the condition's G responses whose final answer differs from the segment's own answer,
the most frequent answer of its ``hard_prefix`` group (ties: the first sampled); responses without
an answer count as differing; segments whose ``hard_prefix`` group has no answer at all are left
out of the bypass rate (``bypass_groups`` counts those kept). ``hard_prefix``'s own bypass rate is
the spread of its group around its mode (the floor); ``q``'s is the level of a prompt that never
saw the segment.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from megatron_skpo.analysis.metrics import (
    AnswerCodes, all_same_outcome, bypass, distinct_answers, modal_answer, relative_positions, skpo_cut)
from megatron_skpo.analysis.sampling import (
    AnalysisError, Decoding, Grader, TaskSpec, decode, generate_all, load_task, open_engine)

# the acceptance the skip text is chosen by (docs/algorithm.md §7): [s, q] keeps most of the
# unconditional accuracy and does not collapse groups to one outcome
MIN_ACCURACY_RATIO = 0.8
MAX_ZERO_ADV_GAP = 0.10


@dataclass(frozen=True)
class Condition:
    name: str  # "q", "hard_prefix", "skip" (or "skip1", "skip2", ... for several skip texts)
    kind: str  # "q" | "hard_prefix" | "skip"
    skip_text: Optional[str] = None


def conditions_for(skip_texts: Sequence[str]) -> list[Condition]:
    several = len(skip_texts) > 1
    skips = [Condition(f"skip{i + 1}" if several else "skip", "skip", t) for i, t in enumerate(skip_texts)]
    return [Condition("q", "q"), Condition("hard_prefix", "hard_prefix"), *skips]


@dataclass
class ConditionStats:
    """One condition at one relative position (``position`` None: every position)."""

    condition: str
    position: Optional[int]  # index into the relative positions
    frac: Optional[float]  # the nominal relative position
    groups: int  # segments (groups of G responses)
    cut_tokens: float  # mean segment length t
    accuracy: float
    distinct_answers: float  # mean per group (no-answer responses not counted)
    zero_adv_rate: float  # fraction of groups with all G outcomes equal
    no_answer_rate: float
    response_tokens: float  # mean generated tokens
    bypass_rate: float  # mean over bypass_groups of the per-group bypass fraction
    bypass_groups: int


def summarize_condition(name: str, correct: Tensor, ids: Tensor, lengths: Tensor, reference: Tensor,
                        position: Tensor, cut: Tensor, fracs: Sequence[float]) -> list[ConditionStats]:
    """Statistics of one condition over S segments, per position and over all of them.

    correct [S, G] bool, ids [S, G] answer codes, lengths [S, G] generated tokens, reference [S]
    the segments' own answers (``modal_answer`` of the hard-prefix groups), position [S] index into
    ``fracs``, cut [S] segment lengths.
    """
    nan = float("nan")
    by = bypass(ids, reference)
    no_answer = ids == -1
    zero = all_same_outcome(correct)
    distinct = distinct_answers(ids)

    def stats(rows: Tensor, pos: Optional[int]) -> ConditionStats:
        n = int(rows.sum())
        mean = (lambda x: float(x[rows].to(torch.float64).mean()) if n else nan)  # noqa: E731
        b = by[rows]
        b = b[~torch.isnan(b)]
        return ConditionStats(name, pos, None if pos is None else fracs[pos], n, mean(cut), mean(correct),
                              mean(distinct), mean(zero), mean(no_answer), mean(lengths),
                              float(b.mean()) if b.numel() else nan, int(b.numel()))

    out = [stats(position == j, j) for j in range(len(fracs))]
    out.append(stats(torch.ones_like(position, dtype=torch.bool), None))
    return out


@dataclass
class ShortcutResult:
    settings: dict
    conditions: list[Condition]
    fracs: list[float]
    base: dict  # the base responses: count, accuracy, mean tokens, skipped (too short to cut)
    rows: list[ConditionStats]
    acceptance: list[dict] = field(default_factory=list)
    grading: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def overall(self, condition: str) -> ConditionStats:
        return next(r for r in self.rows if r.condition == condition and r.position is None)

    def as_dict(self) -> dict:
        return {"settings": self.settings, "conditions": [asdict(c) for c in self.conditions], "fracs": self.fracs,
                "base": self.base, "acceptance": self.acceptance, "rows": [asdict(r) for r in self.rows],
                "grading": self.grading, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "ShortcutResult":
        """Read back ``shortcut.json`` (e.g. to redraw the plot)."""
        return cls(d["settings"], [Condition(**c) for c in d["conditions"]], d["fracs"], d["base"],
                   [ConditionStats(**r) for r in d["rows"]], d["acceptance"], d["grading"], d["seconds"])


def acceptance(result: ShortcutResult, min_ratio: float = MIN_ACCURACY_RATIO,
               max_gap: float = MAX_ZERO_ADV_GAP) -> list[dict]:
    """Per skip condition, over all positions: accuracy / q's accuracy and |zero-adv rate - q's|."""
    q = result.overall("q")
    out = []
    for c in result.conditions:
        if c.kind != "skip":
            continue
        s = result.overall(c.name)
        ratio = s.accuracy / q.accuracy if q.accuracy > 0 else float("nan")
        gap = abs(s.zero_adv_rate - q.zero_adv_rate)
        out.append({"condition": c.name, "skip_text": c.skip_text, "accuracy_ratio": ratio, "zero_adv_gap": gap,
                    "min_accuracy_ratio": min_ratio, "max_zero_adv_gap": max_gap,
                    "passes": bool(ratio >= min_ratio and gap <= max_gap)})
    return out


@dataclass
class _Segment:
    problem: int
    base: int
    position: int
    length: int
    cut: int
    ids: list[int]
    text: str


def cut_segments(base: Sequence[Sequence], eos: int, fracs: Sequence[float], tokenizer) -> tuple[list[_Segment], int]:
    """Every base response cut at every position (SKPO's interval); returns (segments, skipped):
    responses shorter than 2 content tokens have no such cut."""
    segments, skipped = [], 0
    for i, gens in enumerate(base):
        for b, g in enumerate(gens):
            ids = g.token_ids[:-1] if g.token_ids and g.token_ids[-1] == eos else g.token_ids
            if len(ids) < 2:
                skipped += 1
                continue
            for j, f in enumerate(fracs):
                t = skpo_cut(len(ids), f)
                segments.append(_Segment(i, b, j, len(ids), t, list(ids[:t]), decode(tokenizer, ids[:t])))
    return segments, skipped


def condition_prompt(c: Condition, problem, segment: _Segment, tokenizer) -> list[int]:
    """The prompt ids a condition samples its G continuations from."""
    from megatron_skpo.skpo.prompt import build_downstream_prompt

    if c.kind == "q":
        return problem.prompt_ids
    return build_downstream_prompt(problem.content, segment.ids, segment.text, tokenizer, template=c.skip_text or "",
                                   mode="skip" if c.kind == "skip" else "hard_prefix", slot=problem.slot,
                                   prompt_ids=problem.prompt_ids).token_ids


def run_shortcut(model: str, task: TaskSpec, decoding: Decoding, *, group_size: int = 8, positions: int = 6,
                 base_responses: int = 1, skip_texts: Optional[Sequence[str]] = None,
                 downstream_budget: str = "remaining", extractors: Sequence[str] = (), workers: int = 2,
                 grading_timeout: float = 5.0, out: Optional[Path] = None, progress: bool = True) -> ShortcutResult:
    """Run the shortcut analysis on ``model`` (an HF directory); writes ``segments.jsonl`` under ``out``."""
    from transformers import AutoTokenizer

    from megatron_skpo.data.prompts import get_template
    from megatron_skpo.rollout.engine import GenRequest

    template = get_template(task.prompt_template)
    extractors = tuple(extractors or template.extractors)
    skip_texts = list(skip_texts or [template.skip])
    _check_settings(group_size, positions, base_responses, downstream_budget, skip_texts)
    conditions = conditions_for(skip_texts)
    fracs = relative_positions(positions)
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(model)
    problems = load_task(task, tokenizer)
    engine = open_engine(model, decoding, template.stop)
    seconds = {"engine_start": time.monotonic() - t0}
    try:
        t1 = time.monotonic()
        base = generate_all(engine, [GenRequest(p.prompt_ids, base_responses, decoding.max_tokens, None)
                                     for p in problems], "base responses", progress)
        segments, skipped = cut_segments(base, engine.eos_token_id, fracs, tokenizer)
        if not segments:
            raise AnalysisError("shortcut: every base response is shorter than 2 tokens; nothing to cut "
                                "(raise --max-tokens or check the prompt template)")
        requests = _continuation_requests(segments, conditions, problems, tokenizer, decoding, group_size,
                                          downstream_budget)
        gens = generate_all(engine, requests, "continuations", progress)
        seconds["generation"] = time.monotonic() - t1
    finally:
        engine.close()

    t2 = time.monotonic()
    graded = _grade(base, gens, segments, conditions, problems, tokenizer, extractors, workers, grading_timeout)
    seconds["grading"] = time.monotonic() - t2
    codes = AnswerCodes()
    per = _per_condition(conditions, graded["grades"], gens, len(segments), group_size, codes)
    reference = modal_answer(per["hard_prefix"]["ids"])
    position = torch.tensor([s.position for s in segments])
    cut = torch.tensor([s.cut for s in segments])
    rows = [r for c in conditions for r in summarize_condition(
        c.name, per[c.name]["correct"], per[c.name]["ids"], per[c.name]["lengths"], reference, position, cut, fracs)]
    base_correct = [g.status == "correct" for g in graded["base_grades"]]
    base_len = [len(g.token_ids) for gs in base for g in gs]
    result = ShortcutResult(
        settings={"model": str(model), **asdict(task), **asdict(decoding), "group_size": group_size,
                  "positions": positions, "base_responses": base_responses, "downstream_budget": downstream_budget,
                  "extractors": list(extractors), "stop": list(template.stop)},
        conditions=conditions, fracs=fracs,
        base={"problems": len(problems), "responses": len(base_correct),
              "accuracy": sum(base_correct) / len(base_correct), "mean_tokens": sum(base_len) / len(base_len),
              "skipped_short": skipped, "segments": len(segments)},
        rows=rows, grading=graded["counts"], seconds={k: round(v, 1) for k, v in seconds.items()})
    result.acceptance = acceptance(result)
    if out is not None:
        _write_segments(out / "segments.jsonl", segments, problems, base, conditions, fracs, graded, per,
                        reference, codes, group_size)
    return result


def _check_settings(group_size: int, positions: int, base_responses: int, downstream_budget: str,
                    skip_texts: list[str]) -> None:
    from megatron_skpo.skpo.prompt import fill_template

    if group_size < 2 or positions < 1 or base_responses < 1:
        raise AnalysisError(f"shortcut: need --group-size >= 2, --positions >= 1 and --base-responses >= 1, got "
                            f"{group_size}, {positions}, {base_responses}")
    if downstream_budget not in ("remaining", "full"):
        raise AnalysisError(f"--downstream-budget: got {downstream_budget!r}; allowed values: 'remaining', 'full'")
    for text in skip_texts:
        try:
            fill_template(text, "s", "q")
        except ValueError as e:
            raise AnalysisError(f"--skip-template: {e}") from None


def _continuation_requests(segments, conditions, problems, tokenizer, decoding: Decoding, group_size: int,
                           downstream_budget: str) -> list:
    """Segment-major, conditions inner: request ``k * C + c``."""
    from megatron_skpo.rollout.engine import GenRequest

    requests = []
    for s in segments:
        after = decoding.max_tokens - s.cut if downstream_budget == "remaining" else decoding.max_tokens
        for c in conditions:
            requests.append(GenRequest(condition_prompt(c, problems[s.problem], s, tokenizer), group_size,
                                       decoding.max_tokens if c.kind == "q" else max(after, 1), None))
    return requests


def _grade(base, gens, segments, conditions, problems, tokenizer, extractors, workers: int,
           grading_timeout: float) -> dict:
    """Base responses and every continuation graded in one worker pool (texts kept for the JSONL)."""
    C = len(conditions)
    with Grader(extractors, workers, grading_timeout) as grader:
        base_texts = [decode(tokenizer, g.token_ids) for gs in base for g in gs]
        base_grades = grader.grade(base_texts, [p.gold for p, gs in zip(problems, base) for _ in gs])
        texts, golds = [], []
        for i, group in enumerate(gens):
            s, c = segments[i // C], conditions[i % C]
            # the hard prefix's response is the segment and its continuation; the others' the continuation
            texts += [decode(tokenizer, (s.ids if c.kind == "hard_prefix" else []) + g.token_ids) for g in group]
            golds += [problems[s.problem].gold] * len(group)
        grades = grader.grade(texts, golds)
        counts = dict(grader.counts)
    return {"base_texts": base_texts, "base_grades": base_grades, "texts": texts, "grades": grades,
            "counts": counts}


def _per_condition(conditions, grades, gens, S: int, G: int, codes: AnswerCodes) -> dict[str, dict[str, Tensor]]:
    """Per condition, ``[segments, G]`` tensors of correctness, answer codes and response lengths."""
    C, per = len(conditions), {}
    for ci, c in enumerate(conditions):
        sel = [k * C + ci for k in range(S)]
        gr = [grades[i * G + g] for i in sel for g in range(G)]
        per[c.name] = {
            "correct": torch.tensor([x.status == "correct" for x in gr]).view(S, G),
            "ids": torch.tensor(codes.encode([x.answer for x in gr]), dtype=torch.long).view(S, G),
            "lengths": torch.tensor([len(gens[i][g].token_ids) for i in sel for g in range(G)]).view(S, G)}
    return per


def _write_segments(path: Path, segments, problems, base, conditions, fracs, graded: dict, per, reference,
                    codes: AnswerCodes, G: int) -> None:
    """One JSON line per segment: its base response, reference answer and every condition's group."""
    C, texts, grades = len(conditions), graded["texts"], graded["grades"]
    answers = {j: a for a, j in codes.ids.items()}
    first = [0]
    for gs in base:
        first.append(first[-1] + len(gs))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for k, s in enumerate(segments):
            rec = {"uid": problems[s.problem].uid, "gold": problems[s.problem].gold, "base": s.base,
                   "base_text": graded["base_texts"][first[s.problem] + s.base], "frac": fracs[s.position],
                   "length": s.length, "cut": s.cut, "segment": s.text,
                   "reference_answer": answers.get(int(reference[k]))}
            for ci, c in enumerate(conditions):
                i = k * C + ci
                rec[c.name] = {"responses": texts[i * G:(i + 1) * G],
                               "answers": [x.answer for x in grades[i * G:(i + 1) * G]],
                               "correct": per[c.name]["correct"][k].tolist()}
            f.write(json.dumps(rec) + "\n")


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(result: ShortcutResult) -> str:
    """The overall table (every position) and accuracy / zero-adv rate / bypass rate by position."""
    lines = ["| condition | accuracy | distinct answers | zero-adv rate | no answer | tokens | bypass | acceptance |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    acc = {a["condition"]: a for a in result.acceptance}
    for c in result.conditions:
        r = result.overall(c.name)
        a = acc.get(c.name)
        verdict = (f"{'pass' if a['passes'] else 'fail'} (acc x{_fmt(a['accuracy_ratio'], 2)}, "
                   f"zero-adv gap {_fmt(a['zero_adv_gap'], 2)})") if a else ""
        lines.append(f"| {c.name} | {_fmt(r.accuracy)} | {_fmt(r.distinct_answers, 2)} | {_fmt(r.zero_adv_rate)} | "
                     f"{_fmt(r.no_answer_rate)} | {_fmt(r.response_tokens, 1)} | {_fmt(r.bypass_rate)} | {verdict} |")
    skips = [c for c in result.conditions if c.kind == "skip"]
    if len(skips) > 1 or (skips and skips[0].name != "skip"):
        lines += [""] + [f"- `{c.name}`: `{json.dumps(c.skip_text)}`" for c in skips]
    elif skips:
        lines += ["", f"- `skip`: `{json.dumps(skips[0].skip_text)}`"]
    lines += ["", "accuracy / zero-adv rate / bypass rate by relative position:", "",
              "| condition | " + " | ".join(f"{f:.3f}" for f in result.fracs) + " |",
              "|---|" + "---:|" * len(result.fracs)]
    for c in result.conditions:
        cells = [f"{_fmt(r.accuracy, 2)} / {_fmt(r.zero_adv_rate, 2)} / {_fmt(r.bypass_rate, 2)}"
                 for r in result.rows if r.condition == c.name and r.position is not None]
        lines.append(f"| {c.name} | " + " | ".join(cells) + " |")
    b = result.base
    lines += ["", f"{b['problems']} problems, {b['responses']} base responses (accuracy {_fmt(b['accuracy'])}, "
                  f"{_fmt(b['mean_tokens'], 1)} tokens), {b['segments']} segments, G = {result.settings['group_size']}"]
    return "\n".join(lines) + "\n"


def plot(result: ShortcutResult, path: Path) -> None:
    """Accuracy, zero-advantage rate, bypass rate and distinct answers by position, one line per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("accuracy", "accuracy"), ("zero_adv_rate", "zero-advantage rate"), ("bypass_rate", "bypass rate"),
              ("distinct_answers", "distinct answers per group")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        for i, c in enumerate(result.conditions):
            rows = [r for r in result.rows if r.condition == c.name and r.position is not None]
            ax.plot([r.frac for r in rows], [getattr(r, key) for r in rows], marker="o", color=f"C{i % 10}",
                    label=c.name, linestyle="--" if c.kind != "skip" else "-")
        ax.set_title(title)
        ax.set_xlabel("cut position (fraction of the response)")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.suptitle(f"shortcut validation: {Path(result.settings['model']).name} on {result.settings['dataset']}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: ShortcutResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "shortcut.json").write_text(json.dumps(result.as_dict(), indent=2))
    (out / "shortcut.md").write_text(markdown(result))
    plot(result, out / "shortcut.png")
