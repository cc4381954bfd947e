"""Data, reward and evaluation sections of the config tree."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_skpo.config.base import check, doc


@dataclass
class DatasetConfig:
    """One dataset: a built-in recipe name or a JSONL/Parquet file with a field mapping."""

    name: Optional[str] = doc(None, "built-in recipe (gsm8k_train, math500, mawps_easy, ...) or null for a file")
    path: Optional[str] = doc(None, "JSONL or Parquet file (used when name is null)")
    prompt_field: str = doc("problem", "field holding the problem text (dotted for nested, e.g. prompt.0.content)")
    answer_field: str = doc("answer", "field holding the gold answer (e.g. reward_model.ground_truth)")
    offset: int = doc(0, "skip the first N valid rows (e.g. to hold out the rows an evaluation uses)")
    limit: Optional[int] = doc(None, "keep the first N rows after validation (after offset)")

    def __post_init__(self):
        check(self.name is not None or self.path is not None, "name/path", "set a recipe name or a file path")
        check(self.limit is None or self.limit > 0, "limit", "must be > 0 or null")
        check(self.offset >= 0, "offset", "must be >= 0")
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
class RewardConfig:
    """Verifiable reward."""

    kind: Literal["math", "code"] = doc("math", "math = answer equivalence via math-verify; code = tests in a sandbox")
    correct: float = doc(1.0, "reward of a correct answer (SKPO: +1)")
    incorrect: float = doc(-1.0, "reward of a wrong answer (SKPO: -1; 0 for 0/1 rewards)")
    format_penalty: float = doc(0.0, "added when no final answer can be extracted")
    answer_fallbacks: list[str] = doc(
        factory=lambda: ["boxed", "the_answer_is"], help="extraction order: boxed, the_answer_is, last_number")
    timeout_s: float = doc(5.0, "hard per-item grading timeout (timeouts score as incorrect)")
    workers: int = doc(2, "grading worker processes")
    memory_mb: int = doc(4096, "address-space limit of each grading worker (0 = none)")

    def __post_init__(self):
        from megatron_skpo.rewards.extract import EXTRACTORS  # light: regexes and the registry only

        for i, name in enumerate(self.answer_fallbacks):
            check(name in EXTRACTORS, f"reward.answer_fallbacks[{i}]",
                  f"got {name!r}; allowed values: {', '.join(EXTRACTORS.names())}")
        check(len(self.answer_fallbacks) > 0, "reward.answer_fallbacks", "needs at least one extractor")
        check(self.memory_mb >= 0, "reward.memory_mb", "must be >= 0")
        check(0 < self.timeout_s <= 600, "reward.timeout_s", "must be in (0, 600] seconds per item")
        check(1 <= self.workers <= 256, "reward.workers", "must be in [1, 256] processes")
