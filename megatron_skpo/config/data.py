"""Data, reward and evaluation sections of the config tree."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_skpo.config.base import check, doc


@dataclass
class DatasetConfig:
    """One dataset: a built-in recipe name or a JSONL/Parquet file, read by a field mapping or a named format."""

    name: Optional[str] = doc(None, "built-in recipe (gsm8k_train, math500, mawps_easy, ...) or null for a file")
    path: Optional[str] = doc(None, "JSONL or Parquet file (used when name is null)")
    format: str = doc("fields", "how the file's rows are read: 'fields' (the *_field mapping below) or a named "
                      "format (math, aime, amc, olympiadbench, mmlu_pro, livecodebench, taco; see docs/data.md)")
    prompt_field: str = doc("problem", "field holding the problem text (dotted for nested, e.g. prompt.0.content)")
    answer_field: Optional[str] = doc("answer", "field holding the gold answer (e.g. reward_model.ground_truth); "
                                      "null for code problems graded by tests only")
    tests_field: Optional[str] = doc(None, "code: field holding the tests, a list of {input, output} (or a JSON "
                                     "string of one, or TACO's {inputs: [...], outputs: [...]})")
    fn_name_field: Optional[str] = doc(None, "code: field naming the function functional tests call (LeetCode style)")
    choices_field: Optional[str] = doc(None, "multiple choice: field holding the option texts (a list, A first)")
    extra_fields: list[str] = doc(factory=list, help="more fields passed to custom rewards (reference[name])")
    offset: int = doc(0, "skip the first N valid rows (e.g. to hold out the rows an evaluation uses)")
    limit: Optional[int] = doc(None, "keep the first N rows after validation (after offset)")

    def __post_init__(self):
        check(self.name is not None or self.path is not None, "name/path", "set a recipe name or a file path")
        check(self.limit is None or self.limit > 0, "limit", "must be > 0 or null")
        check(self.offset >= 0, "offset", "must be >= 0")
        check(self.answer_field is not None or self.tests_field is not None or self.format != "fields",
              "answer_field", "null needs tests_field (code problems are graded by their tests)")
        check(self.path is None or str(self.path).endswith((".jsonl", ".json", ".parquet")), "path",
              f"got {self.path!r}; expected a .jsonl or .parquet file")


@dataclass
class DataConfig:
    """Training and held-out problems and how prompts are rendered."""

    train: DatasetConfig = doc(factory=lambda: DatasetConfig(name="math_train"), help="training problems")
    eval: Optional[DatasetConfig] = doc(None, "held-out problems validated inside the loop (see validation)")
    prompt_template: str = doc(
        "qwen_math", "named template (qwen_math, fewshot_plain, raw) or a format string with {problem}")
    use_chat_template: bool = doc(True, "render through the tokenizer's chat template")
    invalid_policy: Literal["error", "skip"] = doc(
        "skip", "bad rows: fail naming file and row, or skip and count (MATH train has 2 rows without a usable \\boxed{})")
    shuffle_seed: int = doc(0, "seed of the deterministic, resumable sampling order")


@dataclass
class RewardTermConfig:
    """One term of a weighted reward (``reward.kind: weighted``)."""

    kind: str = doc("math", "a registered reward (math, multiple_choice, code, format) or custom")
    weight: float = doc(1.0, "the term's reward is multiplied by this")
    custom: Optional[str] = doc(None, "kind custom: path/to/file.py:function or package.module:function")


@dataclass
class CodeRewardConfig:
    """How the code reward runs programs (each test in a fresh sandbox; docs/security.md)."""

    wall_s: float = doc(10.0, "wall-clock limit of one test run (the sandbox is killed after it)")
    cpu_s: int = doc(5, "CPU-seconds limit of one test run")
    memory_mb: int = doc(512, "address-space limit of each process of a test run")
    partial_credit: bool = doc(False, "score the fraction of tests passed (mapped onto [incorrect, correct]) "
                               "instead of all-or-nothing; correctness still needs every test")

    def __post_init__(self):
        check(0 < self.wall_s <= 600, "reward.code.wall_s", "must be in (0, 600] seconds")
        check(self.cpu_s >= 1, "reward.code.cpu_s", "must be >= 1")
        check(self.memory_mb >= 16, "reward.code.memory_mb", "must be >= 16")


@dataclass
class RewardConfig:
    """Verifiable reward: a registered kind, a custom function, or a weighted list of them."""

    kind: str = doc("math", "math (answer equivalence via math-verify), multiple_choice, code (tests in a sandbox), "
                    "format, custom (reward.custom), or weighted (reward.terms)")
    custom: Optional[str] = doc(None, "kind custom: path/to/file.py:function or package.module:function, called as "
                                "fn(response, reference) -> float | bool | dict (docs/rewards.md)")
    terms: list[RewardTermConfig] = doc(factory=list, help="kind weighted: [{kind, weight, custom}]; the score is "
                                        "the weighted sum, correctness is the first term's")
    correct: float = doc(1.0, "reward of a correct answer (SKPO: +1)")
    incorrect: float = doc(-1.0, "reward of a wrong answer (SKPO: -1; 0 for 0/1 rewards)")
    format_penalty: float = doc(0.0, "added when no final answer can be extracted")
    answer_fallbacks: list[str] = doc(
        factory=lambda: ["boxed", "the_answer_is"], help="extraction order: boxed, the_answer_is, last_number")
    timeout_s: float = doc(5.0, "hard per-item grading timeout (timeouts score as incorrect); for code it covers "
                           "all of a problem's tests")
    workers: int = doc(2, "grading worker processes")
    memory_mb: int = doc(4096, "address-space limit of each grading worker (0 = none)")
    code: CodeRewardConfig = doc(factory=CodeRewardConfig, help="code reward: sandbox limits, partial credit")

    def __post_init__(self):
        from megatron_skpo.rewards.extract import EXTRACTORS  # light: regexes and the registry only
        from megatron_skpo.rewards.kinds import CUSTOM, REWARDS

        kinds = [*REWARDS.names(), CUSTOM]
        check(self.kind in (*kinds, "weighted"), "reward.kind",
              f"got {self.kind!r}; allowed values: {', '.join(kinds)}, weighted")
        check((self.kind == CUSTOM) == (self.custom is not None), "reward.custom",
              "set it (path/to/file.py:function) with reward.kind: custom, and only then")
        check((self.kind == "weighted") == bool(self.terms), "reward.terms",
              "give a list of {kind, weight} with reward.kind: weighted, and only then")
        for i, t in enumerate(self.terms):
            check(t.kind in kinds, f"reward.terms[{i}].kind", f"got {t.kind!r}; allowed values: {', '.join(kinds)}")
            check((t.kind == CUSTOM) == (t.custom is not None), f"reward.terms[{i}].custom",
                  "set it with kind: custom, and only then")
        for i, name in enumerate(self.answer_fallbacks):
            check(name in EXTRACTORS, f"reward.answer_fallbacks[{i}]",
                  f"got {name!r}; allowed values: {', '.join(EXTRACTORS.names())}")
        check(len(self.answer_fallbacks) > 0, "reward.answer_fallbacks", "needs at least one extractor")
        check(self.memory_mb >= 0, "reward.memory_mb", "must be >= 0")
        check(0 < self.timeout_s <= 600, "reward.timeout_s", "must be in (0, 600] seconds per item")
        check(1 <= self.workers <= 256, "reward.workers", "must be in [1, 256] processes")
        if "code" in self.kinds():
            check(self.timeout_s >= self.code.wall_s, "reward.timeout_s",
                  f"{self.timeout_s} s is shorter than one test run (reward.code.wall_s {self.code.wall_s} s); "
                  "it bounds all of a problem's tests together")

    def kinds(self) -> list[str]:
        """The reward kinds this section runs (the terms' for a weighted reward)."""
        return [t.kind for t in self.terms] if self.kind == "weighted" else [self.kind]
