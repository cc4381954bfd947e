"""math_reward / RewardPool on the hand-checked table, adversarial outputs, and the reward variants."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from megatron_skpo.rewards import RewardPool, RewardSpec, math_reward, reward_of
from megatron_skpo.rewards.extract import answer_is, extract_answer, last_boxed, last_number

ROOT = Path(__file__).resolve().parents[2]
TABLE = yaml.safe_load((Path(__file__).parent / "math_cases.yaml").read_text())
DEFAULT = [(s, c) for s, cases in TABLE.items() if s != "with_last_number" for c in cases]
LAST_NUMBER = [("with_last_number", c) for c in TABLE["with_last_number"]]


def _ids(cases):
    return [f"{s}-{i}" for i, (s, _) in enumerate(cases)]


@pytest.fixture(scope="module")
def pool():
    with RewardPool(workers=2, timeout_s=10.0) as p:
        yield p


@pytest.fixture(scope="module")
def pool_last_number():
    with RewardPool(workers=1, timeout_s=10.0, extractors=("boxed", "the_answer_is", "last_number")) as p:
        yield p


def test_table_is_large_and_covers_every_category():
    assert len(DEFAULT) + len(LAST_NUMBER) >= 150
    assert {"fractions", "radicals", "intervals", "sets_tuples", "percentages", "units", "multiple_boxes",
            "missing_boxes", "latex_noise", "equivalent_forms"} <= set(TABLE)
    assert {c[2] for _, c in DEFAULT} == {1, -1}  # both outcomes are exercised


@pytest.mark.parametrize("section,case", DEFAULT, ids=_ids(DEFAULT))
def test_table_default_extractors(pool, section, case):
    rewards, stats = pool.score([case[0]], [str(case[1])])
    assert rewards == [float(case[2])], case
    assert stats.timeout == stats.error == 0


@pytest.mark.parametrize("section,case", LAST_NUMBER, ids=_ids(LAST_NUMBER))
def test_table_with_last_number(pool_last_number, section, case):
    rewards, _ = pool_last_number.score([case[0]], [str(case[1])])
    assert rewards == [float(case[2])], case


def test_batch_equals_one_by_one(pool):
    cases = [c for _, c in DEFAULT[:40]]
    rewards, stats = pool.score([c[0] for c in cases], [str(c[1]) for c in cases])
    assert rewards == [float(c[2]) for c in cases]
    assert stats.n == 40 and stats.correct == sum(c[2] == 1 for c in cases)


def test_public_math_reward_and_threads():
    assert math_reward("so \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_reward("so \\boxed{3}", "4") == -1.0
    out = []  # math-verify's signal timeouts would raise in a thread; our workers grade in their main thread
    t = threading.Thread(target=lambda: out.append(math_reward("The answer is 7.", "7")))
    t.start(), t.join()
    assert out == [1.0]


ADVERSARIAL = {
    "tower_of_powers": "\\boxed{9^{9^{9^{9}}}}",
    "huge_factorial": "\\boxed{(10^{10})!}",
    "deep_braces": "\\boxed{" + "{" * 20000 + "1" + "}" * 20000 + "}",
    "unbalanced_braces": "\\boxed{" + "{" * 100000,
    "one_mb_text": "blah " * 200_000 + "\\boxed{2}",
    "one_mb_box": "\\boxed{" + "1+" * 500_000 + "1}",
}


def test_adversarial_outputs_return_within_timeout():
    timeout = 2.0
    with RewardPool(workers=2, timeout_s=timeout) as p:
        t0 = time.monotonic()
        rewards, stats = p.score(list(ADVERSARIAL.values()), ["1"] * len(ADVERSARIAL))
        elapsed = time.monotonic() - t0
        # Two workers, six items: at worst three rounds of timeouts plus worker restarts.
        assert elapsed < 3 * timeout + 30
        assert rewards == [-1.0] * len(ADVERSARIAL)  # none equals 1 (the 1 MB text's box says 2)
        assert stats.n == 6 and stats.timeout >= 1  # the tower of powers cannot finish in 2 s
        assert stats.correct == 0 and stats.timeout + stats.incorrect + stats.no_answer + stats.error == 6
        # The pool survives: killed workers were replaced.
        assert p.score(["\\boxed{4}"], ["4"])[0] == [1.0]


def test_timeouts_are_counted_not_raised():
    with RewardPool(workers=1, timeout_s=1.0) as p:
        rewards, stats = p.score(["\\boxed{9^{9^{9^{9}}}}", "\\boxed{5}"], ["1", "5"])
    assert rewards == [-1.0, 1.0]
    assert (stats.timeout, stats.correct, stats.n) == (1, 1, 2)
    assert stats.as_dict()["timeout"] == 1


@pytest.mark.parametrize("status,spec,expected", [
    ("correct", RewardSpec(), 1.0),
    ("incorrect", RewardSpec(), -1.0),
    ("timeout", RewardSpec(), -1.0),  # a timeout is a wrong answer
    ("error", RewardSpec(), -1.0),
    ("no_answer", RewardSpec(), -1.0),
    ("correct", RewardSpec.preset("zero_one"), 1.0),
    ("incorrect", RewardSpec.preset("zero_one"), 0.0),
    ("no_answer", RewardSpec.preset("zero_one", format_penalty=-0.5), -0.5),
    ("no_answer", RewardSpec(format_penalty=-0.2), -1.2),
    ("incorrect", RewardSpec(format_penalty=-0.2), -1.0),  # the penalty only hits missing answers
])
def test_reward_variants(status, spec, expected):
    assert reward_of(status, spec) == pytest.approx(expected)


def test_pool_uses_its_spec():
    with RewardPool(workers=1, spec=RewardSpec.preset("zero_one", format_penalty=-0.1)) as p:
        rewards, _ = p.score(["\\boxed{1}", "\\boxed{2}", "no answer"], ["1", "1", "1"])
    assert rewards == pytest.approx([1.0, 0.0, -0.1])


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
    ("x \\boxed{1} y \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\boxed {3}", "3"),
    ("\\boxed 7$", "7"),
    ("\\boxed{a{b}c}", "a{b}c"),
    ("\\boxed{1} \\boxed{2", "1"),
    ("no box", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_extractors_and_order():
    assert answer_is("The final answer is: 12.") == "12"
    assert last_number("from 3 to 1,234.5 m") == "1,234.5"
    assert extract_answer("The answer is 3. \\boxed{4}") == "4"
    assert extract_answer("3 then 4", ("boxed", "the_answer_is")) is None
    assert extract_answer("3 then 4", ("last_number",)) == "4"
    with pytest.raises(KeyError, match="unknown answer extractor 'nope'"):
        extract_answer("x", ("nope",))


def test_extraction_is_linear_on_1mb():
    text = "word {" * 170_000 + "\\boxed{9}"
    t0 = time.monotonic()
    assert extract_answer(text) == "9"
    assert time.monotonic() - t0 < 2.0


def test_pool_from_config():
    from megatron_skpo.config import load_config

    cfg = load_config(None, ["reward.incorrect=0.0", "reward.format_penalty=-0.5", "reward.workers=1"]).reward
    with RewardPool.from_config(cfg) as p:
        assert p.score(["\\boxed{2}", "\\boxed{3}", "nothing"], ["2", "2", "2"])[0] == [1.0, 0.0, -0.5]


# ----- the final stated answer, LaTeX number forms, gold types, and scripts without a main guard ----
@pytest.mark.parametrize("response,gold,expected", [
    ("The answer is $3$ dollars.", "3", 1.0),
    ("The answer is $3$ dollars.", "4", -1.0),
    ("The answer is \\(12\\) apples.", "12", 1.0),
    ("The answer is 1\\,000.", "1000", 1.0),
    ("\\boxed{1\\,000}", "1000", 1.0),
    ("\\boxed{1\\,000\\,000}", "1000000", 1.0),
    ("\\boxed{1\\,000}", "100", -1.0),
    ("the answer is 3.\n...Wait, that's wrong. The answer is 5.", "3", -1.0),
    ("the answer is 3.\n...Wait, that's wrong. The answer is 5.", "5", 1.0),
    ("So \\boxed{3}.\n...Wait, that's wrong. The answer is 5.", "3", -1.0),  # a retracted box loses
    ("So \\boxed{3}.\n...Wait, that's wrong. The answer is 5.", "5", 1.0),
    ("The answer is 5. Let me box it: \\boxed{5}", "5", 1.0),
    ("The answer is 3. Wait, no: \\boxed{5}", "3", -1.0),
    ("The final answer is $\\boxed{7}$.", "7", 1.0),
])
def test_final_stated_answer_and_latex_numbers(pool, response, gold, expected):
    assert pool.score([response], [gold])[0] == [expected]


@pytest.mark.parametrize("gold,response", [(3, "\\boxed{3}"), (1000, "The answer is 1,000."), (2.5, "\\boxed{5/2}"),
                                           (145.0, "\\boxed{145}"), (-4, "The answer is -4.")])
def test_numeric_gold_answers_are_graded(pool, gold, response):
    rewards, stats = pool.score([response], [gold])
    assert rewards == [1.0] and stats.error == 0


@pytest.mark.parametrize("gold", [None, [1, 2], {"a": 1}, True, float("nan")])
def test_other_gold_types_are_a_clear_error(pool, gold):
    with pytest.raises(TypeError, match=r"gold answer 1: .*string or a (finite )?number"):
        pool.score(["\\boxed{1}", "\\boxed{1}"], ["1", gold])


NO_MAIN_GUARD = """from megatron_skpo.rewards import RewardPool, math_reward

print(math_reward("so \\\\boxed{3}", "3"), math_reward("The answer is 5.", 5))
with RewardPool(workers=2, timeout_s=10.0) as pool:
    print(pool.score(["\\\\boxed{4}", "\\\\boxed{2}"], ["4", "4"])[0])
"""


@pytest.mark.slow
def test_plain_script_without_main_guard(tmp_path):
    """Grading workers must not re-import the caller's __main__ (multiprocessing's spawn does)."""
    script = tmp_path / "grade.py"
    script.write_text(NO_MAIN_GUARD)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["1.0 1.0", "[1.0, -1.0]"]


def test_worker_that_cannot_start_is_reported(monkeypatch):
    from megatron_skpo.rewards import pool as pool_module

    monkeypatch.setattr(pool_module, "WORKER_MODULE", "megatron_skpo.rewards.no_such_worker")
    with RewardPool(workers=1) as p:
        with pytest.raises(RuntimeError, match=r"grading worker failed to start \(exit code 1"):
            p.score(["\\boxed{1}"], ["1"])


KILLED_PARENT = """import os
from megatron_skpo.rewards import RewardPool

if __name__ == "__main__":
    pool = RewardPool(workers=1, timeout_s=600.0)
    assert pool.score(["\\\\boxed{1}"], ["1"])[0] == [1.0]
    print(pool._workers[0].proc.pid, flush=True)
    pool._workers[0].conn.send(("\\\\boxed{9^{9^{9^{9}}}}", "1"))  # busy in C code for hours
    os.kill(os.getpid(), 9)
"""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.slow
def test_workers_die_with_a_killed_parent(tmp_path):
    """A worker stuck in sympy must not outlive a trainer killed with SIGKILL."""
    script, out = tmp_path / "killed.py", tmp_path / "out.txt"
    script.write_text(KILLED_PARENT)
    with open(out, "w") as f:  # a file, not a pipe: a surviving worker would hold a pipe open
        r = subprocess.run([sys.executable, str(script)], stdout=f, stderr=subprocess.STDOUT, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert r.returncode == -9, out.read_text()[-2000:]
    worker = int(out.read_text().split()[0])
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    survived = _running(worker)
    if survived:
        os.kill(worker, 9)  # do not leave it burning a core after the failure
    assert not survived
