"""The reward registry: multiple choice, code, format, custom and weighted rewards, in the worker pool."""
import textwrap

import pytest

from megatron_skpo.config import ConfigError, from_dict
from megatron_skpo.config.data import RewardConfig
from megatron_skpo.rewards import RewardPool, RewardSpec
from megatron_skpo.rewards.choice import extract_choice, grade_choice
from megatron_skpo.rewards.code import CodeOptions, extract_code, grade_code
from megatron_skpo.rewards.code_sandbox import SandboxLimits
from megatron_skpo.rewards.kinds import REWARDS, Context, RewardPlan, Term, load_custom, missing_needs
from megatron_skpo.rewards.pool import plan_of
from megatron_skpo.rewards.reference import Reference

CHOICES = ("4", "5", "six", "7")
LIMITS = SandboxLimits(wall_s=5.0, cpu_s=2, memory_mb=256)


@pytest.mark.parametrize("response,letter", [
    ("so \\boxed{B}", "B"), ("\\boxed{(C)}", "C"), ("\\boxed{\\text{D}}", "D"), ("\\boxed{D.}", "D"),
    ("\\boxed{six}", "C"), ("The answer is (A).", "A"), ("Answer: b", "B"), ("the answer is A, not \\boxed{C}", "C"),
    ("\\boxed{42}", None), ("I think it is 5", None), ("The answer is Apples", None),
])
def test_choice_extraction(response, letter):
    assert extract_choice(response, CHOICES) == letter


def test_choice_grade_statuses():
    ref = Reference("B", choices=CHOICES)
    assert grade_choice("\\boxed{B}", ref).correct
    assert grade_choice("\\boxed{A}", ref).status == "incorrect"
    assert grade_choice("no idea", ref).status == "no_answer"
    assert grade_choice("\\boxed{Z}", ref).status == "incorrect"  # past the last option: a wrong choice
    with pytest.raises(ValueError, match="option letter"):
        grade_choice("\\boxed{B}", Reference("E", choices=CHOICES))


def test_code_extraction_takes_the_last_python_block():
    text = "first\n```python\nprint(1)\n```\nthen\n```py\nprint(2)\n```\n```text\nnot code\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("print(4)") is None


ADD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
STDIN_TESTS = ({"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}, {"input": "2 2", "output": "5"})


def test_code_grade_stdin_all_or_nothing_and_partial():
    spec = RewardSpec()
    opts = CodeOptions(LIMITS)
    assert grade_code(ADD, Reference(tests=STDIN_TESTS[:2]), spec, opts).correct
    g = grade_code(ADD, Reference(tests=STDIN_TESTS), spec, opts)
    assert g.status == "incorrect" and g.score is None and g.answer == "failed test 3/3"
    g = grade_code(ADD, Reference(tests=STDIN_TESTS), spec, CodeOptions(LIMITS, partial_credit=True))
    assert g.status == "incorrect" and g.score == pytest.approx(-1 + 2 * 2 / 3)
    assert grade_code("no code here", Reference(tests=STDIN_TESTS), spec, opts).status == "no_answer"


def test_code_grade_functional_tests_call_the_named_function():
    tests = ({"input": "[1, 2, 3]\n2", "output": "[3, 4, 5]"}, {"input": "[]\n7", "output": "[]"})
    cls = "```python\nclass Solution:\n    def addAll(self, xs, k):\n        return [x + k for x in xs]\n```"
    fn = "```python\ndef addAll(xs, k):\n    return [x + k for x in xs]\n```"
    wrong = "```python\ndef addAll(xs, k):\n    return xs\n```"
    for src, ok in ((cls, True), (fn, True), (wrong, False)):
        assert grade_code(src, Reference(tests=tests, fn_name="addAll"), RewardSpec(), CodeOptions(LIMITS)).correct is ok


def _custom(tmp_path, body: str, name: str = "my_reward.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return f"{path}:reward"


def test_custom_reward_return_types_in_the_pool(tmp_path):
    target = _custom(tmp_path, """
        import time
        def reward(response, reference):
            if response == "bool":
                return reference["answer"] == "7"
            if response == "float":
                return 0.25
            if response == "dict":
                return {"score": 1.0, "correct": False, "answer": "x"}
            if response == "raise":
                raise RuntimeError("boom")
            if response == "slow":
                time.sleep(30)
            if response == "extra":
                return 1.0 if reference["source"] == "unit" else -1.0
            return "not a number"
        """)
    plan = RewardPlan((Term("custom", custom=target),), Context(RewardSpec(0.5, 0.0)))
    refs = [Reference("7", extra={"source": "unit"})] * 7
    with RewardPool(workers=1, timeout_s=3.0, plan=plan) as pool:
        scored = pool.evaluate(["bool", "float", "dict", "raise", "bad", "slow", "extra"], refs)
    assert scored.rewards == [0.5, 0.25, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert scored.correct == [True, False, False, False, False, False, True]  # 0.25 < reward.correct 0.5
    assert (scored.stats.error, scored.stats.timeout) == (2, 1)
    assert any("boom" in e for e in scored.stats.errors) and any("not a number" in e for e in scored.stats.errors)


def test_custom_reward_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="reward.custom: no such file"):
        load_custom(f"{tmp_path}/missing.py:reward")
    with pytest.raises(ValueError, match="expected path/to/file.py:function"):
        load_custom("just_a_name")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_custom(_custom(tmp_path, "def reward(r, ref): return 1.0\n").replace(":reward", ":nope"))
    with pytest.raises(ValueError, match=r"cannot be called as fn\(response: str, reference: dict\)"):
        load_custom(_custom(tmp_path, "def reward(response): return 1.0\n", "one_arg.py"))
    with pytest.raises(ValueError, match="importing .* failed: ZeroDivisionError"):
        load_custom(_custom(tmp_path, "1 / 0\n", "broken.py"))
    assert load_custom("math:isclose") is not None  # a module path works too
    plan = RewardPlan((Term("custom", custom=_custom(tmp_path, "def reward(r): pass\n", "bad_sig.py")),))
    with pytest.raises(ValueError, match="reward.custom"):
        RewardPool(workers=1, plan=plan)  # checked before any worker starts


def test_weighted_reward_sums_terms_and_takes_correctness_from_the_first(tmp_path):
    plan = RewardPlan((Term("math", 1.0), Term("format", 0.2)), Context(RewardSpec()))
    with RewardPool(workers=1, timeout_s=10.0, plan=plan) as pool:
        scored = pool.evaluate(["\\boxed{4}", "\\boxed{5}", "no answer"], ["4", "4", "4"])
    assert scored.rewards == pytest.approx([1.2, -0.8, -1.2])
    assert scored.correct == [True, False, False]


def test_registry_names_and_needs():
    assert {"math", "multiple_choice", "code", "format"} <= set(REWARDS.names())
    plan = RewardPlan((Term("code"), Term("format", 0.1)))
    assert plan.needs() == ("tests",)
    refs = [Reference("1"), Reference(tests=STDIN_TESTS)]
    assert missing_needs(plan, refs) == {"tests": 1}
    assert missing_needs(RewardPlan((Term("math"),)), refs) == {"answer": 1}


def test_pool_runs_the_named_kind():
    with RewardPool(workers=1, kind="multiple_choice") as pool:
        scored = pool.evaluate(["\\boxed{B}", "The answer is (C)"], [Reference("B", choices=CHOICES)] * 2)
    assert scored.rewards == [1.0, -1.0] and scored.correct == [True, False]


def test_reward_config_validation(tmp_path):
    def build(**reward):
        return from_dict(RewardConfig, reward, "reward")

    assert build(kind="code", timeout_s=60).kinds() == ["code"]
    for bad, match in [({"kind": "mth"}, "reward.kind: got 'mth'"),
                       ({"kind": "custom"}, "reward.custom: set it"),
                       ({"custom": "a.py:f"}, "reward.custom: set it"),
                       ({"kind": "weighted"}, "reward.terms: give a list"),
                       ({"kind": "weighted", "terms": [{"kind": "nope"}]}, r"reward.terms\[0\].kind"),
                       ({"kind": "code"}, "reward.timeout_s: 5.0 s is shorter than one test run")]:
        with pytest.raises(ConfigError, match=match):
            build(**bad)
    cfg = build(kind="weighted", terms=[{"kind": "custom", "custom": "rel/path.py:f", "weight": 0.5},
                                        {"kind": "format", "weight": 0.1}])
    plan = plan_of(cfg)
    assert plan.terms[0].custom.startswith("/") and plan.terms[0].custom.endswith("rel/path.py:f")
    assert [t.weight for t in plan.terms] == [0.5, 0.1]
