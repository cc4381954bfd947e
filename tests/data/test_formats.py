"""Named data formats on small hand-made files shaped as the published benchmarks, bad rows included."""
import base64
import json
import pickle
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_skpo.config.data import DatasetConfig
from megatron_skpo.data import FORMATS, DataError, load_dataset, load_format
from megatron_skpo.data.formats import NoGlobalsUnpickler, decode_private_tests, parse_tests
from megatron_skpo.rewards.reference import Reference


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _skipped(report):
    """{reason: [rows]} of a skip-policy load (one file)."""
    return {reason: rows for (_, reason), (rows, _) in report.examples.items()}


def _lcb_compress(obj) -> str:
    """LiveCodeBench's private-test encoding: base64(zlib(pickle(json string)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(obj)))).decode()


def test_every_format_is_registered_with_a_kind_and_template():
    assert FORMATS.names() == ["aime", "amc", "livecodebench", "math", "mmlu_pro", "olympiadbench", "taco"]
    kinds = {n: (FORMATS.get(n).kind, FORMATS.get(n).template) for n in FORMATS.names()}
    assert kinds["mmlu_pro"] == ("multiple_choice", "multiple_choice")
    assert kinds["livecodebench"] == kinds["taco"] == ("code", "code")
    assert kinds["aime"] == kinds["olympiadbench"] == ("math", "qwen_math")
    assert all(FORMATS.get(n).read.__doc__ for n in FORMATS.names())  # the mapping is documented


def test_aime_field_variants_and_boxed_fallback(tmp_path):
    path = _jsonl(tmp_path / "aime24.jsonl", [
        {"problem": "P1", "answer": "204"},  # HuggingFaceH4/aime_2024
        {"ID": "2024-I-2", "Problem": "P2", "Answer": 25},  # Maxwell-Jia/AIME_2024: integer answers
        {"question": "P3", "answer": "73"},  # opencompass/AIME2025
        {"problem": "P4", "solution": "so \\boxed{110}."},  # answer only in the solution
        {"problem": "P5", "solution": "no box"},  # bad: no answer at all
        {"text": "P6", "answer": "1"},  # bad: no problem field
    ])
    problems, report = load_format(path, "aime", policy="skip")
    assert [(p.prompt, p.answer) for p in problems] == [("P1", "204"), ("P2", "25"), ("P3", "73"), ("P4", "110")]
    assert _skipped(report) == {"bad_answer": [5], "missing_field": [6]}
    with pytest.raises(DataError, match=r"aime24.jsonl: row 5: answer: no answer field and no \\boxed\{\} in the "):
        load_format(path, "aime", policy="error")
    assert report.examples[(str(path), "missing_field")][1] == "missing field: none of problem, Problem, question"


def test_amc_parquet_float_answers(tmp_path):
    path = tmp_path / "amc23.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": 0, "question": "Q0", "answer": 27.0, "url": "u"},
                                         {"id": 1, "question": "Q1", "answer": 0.5, "url": "u"}]), path)
    problems, _ = load_format(path, "amc")
    assert [(p.prompt, p.answer, p.uid) for p in problems] == [("Q0", "27", "amc23.parquet:1"),
                                                                ("Q1", "0.5", "amc23.parquet:2")]


def test_olympiadbench_answers_and_skipped_rows(tmp_path):
    base = {"modality": "Text-only", "is_multiple_answer": False, "context": None, "image_1": None}
    path = _jsonl(tmp_path / "olympiadbench.jsonl", [
        {**base, "question": "Q1", "final_answer": ["$\\frac{1}{2}$"]},
        {**base, "question": "Q2", "final_answer": ["$3, 5$"], "is_multiple_answer": True},  # one string: kept
        {**base, "question": "Q3", "final_answer": ["$1$", "$2$"]},  # two answers
        {**base, "question": "Q4", "final_answer": ["$1$"], "modality": "Multimodal"},
        {**base, "question": "Q5", "final_answer": ["$1$"], "image_1": "<img>"},
        {**base, "question": "Q6", "final_answer": []},
        {**base, "question": "Q7", "final_answer": ["7"], "context": "A physics setting."},
    ])
    problems, report = load_format(path, "olympiadbench", policy="skip")
    assert [(p.prompt, p.answer) for p in problems] == [("Q1", "\\frac{1}{2}"), ("Q2", "3, 5"),
                                                        ("A physics setting.\n\nQ7", "7")]
    assert _skipped(report) == {"multi_answer": [3], "not_text_only": [4, 5], "bad_answer": [6]}
    assert report.summary_lines()[0].endswith("(bad_answer 1, multi_answer 1, not_text_only 2)")


MMLU_ROW = {"question_id": 1, "question": "Which is prime?", "options": ["4", "6", "7", "9"], "answer": "C",
            "answer_index": 2, "category": "math", "src": "x"}


def test_mmlu_pro_options_rendered_and_answer_checked(tmp_path):
    path = _jsonl(tmp_path / "mmlu_pro.jsonl", [
        MMLU_ROW,
        {**MMLU_ROW, "question": "Q2", "answer": "B"},  # disagrees with answer_index 2
        {**MMLU_ROW, "question": "Q3", "answer": "E", "answer_index": 4},  # past the last option
        {**MMLU_ROW, "question": "Q4", "options": [str(i) for i in range(11)]},  # 11 options
        {**MMLU_ROW, "question": "Q5", "options": ["N/A", "x", "y", "N/A"], "answer": "C", "answer_index": 2},
    ])
    problems, report = load_format(path, "mmlu_pro", policy="skip")
    p = problems[0]
    assert p.prompt == "Which is prime?\n\nOptions:\nA. 4\nB. 6\nC. 7\nD. 9"
    assert (p.answer, p.meta["choices"], p.meta["extra"]) == ("C", ["4", "6", "7", "9"], {"category": "math"})
    # N/A padding is dropped and the gold option keeps its text: "y" is now B.
    assert (problems[1].prompt.split("Options:\n")[1], problems[1].answer) == ("A. x\nB. y", "B")
    assert _skipped(report) == {"bad_answer": [2, 3], "bad_choices": [4]}
    assert Reference.of(p.answer, p.meta).choices == ("4", "6", "7", "9")


def _lcb_row(**over):
    row = {"question_title": "t", "question_content": "Read n, print 2n.", "platform": "atcoder",
           "question_id": "abc1", "contest_id": "abc", "contest_date": "2024-08-01T00:00:00", "starter_code": "",
           "difficulty": "easy", "metadata": "{}",
           "public_test_cases": json.dumps([{"input": "2\n", "output": "4\n", "testtype": "stdin"}]),
           "private_test_cases": _lcb_compress([{"input": "5\n", "output": "10\n", "testtype": "stdin"}])}
    return {**row, **over}


def test_livecodebench_stdin_with_compressed_private_tests(tmp_path):
    plain_private = json.dumps([{"input": "1\n", "output": "2\n", "testtype": "stdin"}])
    path = _jsonl(tmp_path / "livecodebench.jsonl", [_lcb_row(), _lcb_row(question_content="Q2",
                                                                          private_test_cases=plain_private)])
    (a, b), _ = load_format(path, "livecodebench")
    assert a.prompt == "Read n, print 2n." and a.answer == ""
    assert a.meta["tests"] == [{"input": "2\n", "output": "4\n"}, {"input": "5\n", "output": "10\n"}]
    assert "fn_name" not in a.meta and a.meta["extra"]["question_id"] == "abc1"
    assert b.meta["tests"][1] == {"input": "1\n", "output": "2\n"}
    ref = Reference.of(a.answer, a.meta)
    assert ref.has("tests") and not ref.has("answer")


def test_livecodebench_functional_tests_and_starter_code(tmp_path):
    starter = "class Solution:\n    def add(self, a: int, b: int) -> int:\n        "
    tests = [{"input": "1\n2", "output": "3", "testtype": "functional"}]
    row = _lcb_row(question_content="Add a and b.", starter_code=starter, metadata=json.dumps({"func_name": "add"}),
                   public_test_cases=json.dumps(tests), private_test_cases=_lcb_compress(tests * 2))
    [p], _ = load_format(_jsonl(tmp_path / "lcb.jsonl", [row]), "livecodebench")
    assert p.prompt == ("Add a and b.\n\nStarter code:\n```python\nclass Solution:\n    def add(self, a: int, b: int)"
                        " -> int:\n```")
    assert p.meta["fn_name"] == "add" and p.meta["tests"] == [{"input": "1\n2", "output": "3"}] * 3


def test_livecodebench_bad_rows(tmp_path):
    functional = json.dumps([{"input": "1", "output": "1", "testtype": "functional"}])
    path = _jsonl(tmp_path / "lcb.jsonl", [
        _lcb_row(question_content="Q1", private_test_cases="not base64 !!"),
        _lcb_row(question_content="Q2", public_test_cases=functional, private_test_cases=""),  # no func_name
        _lcb_row(question_content="Q3", public_test_cases=functional),  # functional + stdin mixed
        _lcb_row(question_content="Q4", public_test_cases="[]", private_test_cases=""),  # no tests
        _lcb_row(question_content="Q5", public_test_cases="[{"),  # broken JSON
    ])
    problems, report = load_format(path, "livecodebench", policy="skip")
    assert problems == [] and _skipped(report) == {"bad_tests": [1, 2, 3, 4, 5]}
    with pytest.raises(DataError, match=r"lcb.jsonl: row 1: private_test_cases: neither JSON nor compressed JSON"):
        load_format(path, "livecodebench")


class Boom:
    def __reduce__(self):  # unpickling this would call os.system
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_private_tests_never_run_a_pickled_global(tmp_path, monkeypatch):
    evil = base64.b64encode(zlib.compress(pickle.dumps(Boom()))).decode()
    called = []  # plain pickle.loads(evil) would look os.system up and call this
    monkeypatch.setattr("os.system", lambda cmd: called.append(cmd))
    with pytest.raises(ValueError, match=r"UnpicklingError: refused global (os|posix)\.system"):
        decode_private_tests(evil)
    with pytest.raises(pickle.UnpicklingError, match="refused global builtins.eval"):
        import io
        NoGlobalsUnpickler(io.BytesIO(pickle.dumps(eval))).load()
    not_a_string = base64.b64encode(zlib.compress(pickle.dumps([1, 2]))).decode()
    with pytest.raises(ValueError, match="decoded a list, expected a JSON string"):
        decode_private_tests(not_a_string)
    path = _jsonl(tmp_path / "lcb.jsonl", [_lcb_row(private_test_cases=evil)])
    problems, report = load_format(path, "livecodebench", policy="skip")
    assert problems == [] and report.skipped == {"bad_tests": 1} and called == []


def test_taco_stdin_and_fn_name_tests(tmp_path):
    stdin = {"inputs": ["1 2\n", ["3 4", "5"]], "outputs": ["3\n", "7\n"]}
    call = {"fn_name": "add", "inputs": [[1, 2], [[1], [2]]], "outputs": [[3], [[1, 2]]]}
    path = _jsonl(tmp_path / "taco.jsonl", [
        {"question": "Sum.", "input_output": json.dumps(stdin), "starter_code": ""},
        {"question": "Add.", "input_output": json.dumps(call), "starter_code": "def add(a, b):"},
        {"question": "None.", "input_output": json.dumps({"inputs": [], "outputs": []})},
        {"question": "Uneven.", "input_output": json.dumps({"inputs": ["1"], "outputs": []})},
    ])
    problems, report = load_format(path, "taco", policy="skip")
    assert problems[0].meta == {"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "3 4\n5", "output": "7\n"}]}
    assert problems[1].meta["fn_name"] == "add" and problems[1].prompt.endswith("```python\ndef add(a, b):\n```")
    # one JSON value per argument line; the return value unwrapped from APPS's one-element list
    assert problems[1].meta["tests"] == [{"input": "1\n2", "output": "3"}, {"input": "[1]\n[2]", "output": "[1, 2]"}]
    assert _skipped(report) == {"bad_tests": [3, 4]}


@pytest.mark.parametrize("value,tests,fn", [
    ([{"input": "1", "output": "2"}], [{"input": "1", "output": "2"}], None),
    ('[{"input": "1", "output": "2", "testtype": "stdin"}]', [{"input": "1", "output": "2"}], None),
    ({"inputs": [[1]], "outputs": [2], "fn_name": "f"}, [{"input": "1", "output": "2"}], "f"),
], ids=["list", "json-string", "taco-dict"])
def test_parse_tests_shapes(value, tests, fn):
    assert parse_tests(value) == (tests, fn)


def test_fields_format_with_tests_choices_and_extra(tmp_path):
    path = _jsonl(tmp_path / "mixed.jsonl", [
        {"q": "Echo.", "t": json.dumps([{"input": "x", "output": "x"}]), "fn": None, "src": "a"},
        {"q": "Twice.", "t": {"inputs": ["1"], "outputs": ["2"]}, "src": "b"},
        {"q": "No tests.", "t": [], "src": "c"},
    ])
    cfg = DatasetConfig(path=str(path), prompt_field="q", answer_field=None, tests_field="t", extra_fields=["src"])
    problems, report = load_dataset(cfg, "skip")
    assert [(p.answer, p.meta["tests"], p.meta["extra"]) for p in problems] == [
        ("", [{"input": "x", "output": "x"}], {"src": "a"}), ("", [{"input": "1", "output": "2"}], {"src": "b"})]
    assert _skipped(report) == {"bad_tests": [3]}
    # an empty answer is still an error where the problem has no tests
    math = _jsonl(tmp_path / "m.jsonl", [{"problem": "P", "answer": ""}])
    with pytest.raises(DataError, match="row 1: answer: empty answer"):
        load_dataset(DatasetConfig(path=str(math)))
    choice = _jsonl(tmp_path / "c.jsonl", [{"question": "Q", "opts": ["x", "y"], "gold": "B"},
                                          {"question": "Q2", "opts": ["x", "y"], "gold": "C"}])
    problems, report = load_dataset(DatasetConfig(path=str(choice), prompt_field="question", answer_field="gold",
                                                  choices_field="opts"), "skip")
    assert (problems[0].prompt, problems[0].answer) == ("Q\n\nOptions:\nA. x\nB. y", "B")
    assert _skipped(report) == {"bad_answer": [2]}


def test_named_format_from_config(tmp_path):
    path = _jsonl(tmp_path / "aime25.jsonl", [{"problem": f"P{i}", "answer": str(i)} for i in range(4)])
    problems, _ = load_dataset(DatasetConfig(path=str(path), format="aime", offset=1, limit=2))
    assert [p.answer for p in problems] == ["1", "2"]
