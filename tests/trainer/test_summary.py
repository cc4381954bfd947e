import json

from megatron_skpo.trainer.summary import main


def _eval(d, avg, pas):
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"benchmarks": [
        {"benchmark": "mawps_easy", "avg_at_k": avg, "pass_at_k": pas}]}))


def test_summary_tables(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, "reward": -0.5, "accuracy": 0.25, "time/generate": 2.0, "time/train": 4.0},
            {"step": 2, "reward": 0.0, "accuracy": 0.5, "time/generate": 4.0, "time/train": 6.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _eval(tmp_path / "before", 0.25, 0.5)
    _eval(tmp_path / "after", 0.375, 0.75)
    assert main([str(run), "--before", str(tmp_path / "before"), "--after", str(tmp_path / "after")]) == 0
    out = capsys.readouterr().out
    assert "| 2 | 0 | 0.5 |" in out and "| generate | 3.00 |" in out and "| train | 5.00 |" in out
    assert "| mawps_easy | 25.0 | 37.5 | 50.0 | 75.0 |" in out
    assert main([str(tmp_path / "missing")]) == 2


def test_paired_change_hand_worked():
    from megatron_skpo.eval.metrics import paired_change

    # per-problem fractions before (0, .5, 1, .5), after (.5, 1, 1, .5): changes (.5, .5, 0, 0)
    c = paired_change([[0, 0], [1, 0], [1, 1], [0, 1]], [[1, 0], [1, 1], [1, 1], [1, 0]])
    assert (c.problems, c.before, c.after, c.change) == (4, 0.5, 0.75, 0.25)
    assert abs(c.stderr - (1 / 12) ** 0.5 / 2) < 1e-12 and abs(c.z - 0.25 / c.stderr) < 1e-12


def test_summary_reports_the_runs_validation_change(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "validation").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n" + json.dumps({"step": 1, "reward": 0.0}) + "\n")
    for step, correct in ((0, [[0, 0], [1, 0], [1, 1], [0, 1]]), (8, [[1, 0], [1, 1], [1, 1], [1, 0]])):
        (run / "validation" / f"step_{step:06d}.json").write_text(json.dumps({"step": step, "k": 2, "correct": correct}))
    assert main([str(run)]) == 0
    assert "| avg@2 over 4 problems | 50.0 | 75.0 | +25.0 | 14.4 | 1.7 |" in capsys.readouterr().out
