"""skpo-plot: panels per metric, lines per run, errors naming the run or metric."""
from __future__ import annotations

import pytest

from megatron_skpo.cli.plot import build_figure, load_runs, main, moving_average, series
from megatron_skpo.trainer.logging import JsonlSink


def write_run(path, steps, scale, extra=False):
    sink = JsonlSink(path / "metrics.jsonl")
    for s in range(1, steps + 1):
        m = {"reward": scale * s, "accuracy": 0.5 + 0.01 * s * scale}
        if extra:
            m["kl"] = float("nan") if s == 2 else 0.001 * s
        sink.write(s, m)
    sink.close()
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return [str(write_run(root / "skpo", 12, 1.0, extra=True)), str(write_run(root / "grpo", 10, 0.5))]


def test_png_has_a_panel_per_metric_and_a_line_per_run(runs, tmp_path):
    out = tmp_path / "curves.png"
    assert main([*runs, "--metrics", "reward,accuracy,kl", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = build_figure(load_runs(runs), ["reward", "accuracy", "kl"])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["reward", "accuracy", "kl"]
    assert [len(ax.get_lines()) for ax in axes] == [2, 2, 1]  # only skpo logged kl
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["skpo", "grpo"]
    xs = list(axes[2].get_lines()[0].get_xdata())
    assert 2 not in xs and len(xs) == 11  # the NaN (stored as null) step is left out


def test_smoothing_draws_raw_and_mean(runs):
    fig = build_figure(load_runs(runs), ["reward"], smooth=3)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 4 and list(lines[1].get_ydata()[:3]) == pytest.approx([1.0, 1.5, 2.0])


def test_moving_average_matches_loop():
    vals = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    ref = [sum(vals[max(0, i - 2): i + 1]) / len(vals[max(0, i - 2): i + 1]) for i in range(len(vals))]
    assert moving_average(vals, 3) == pytest.approx(ref)


def test_series_skips_missing_and_null():
    recs = [{"step": 1, "a": 1}, {"step": 2}, {"step": 3, "a": None}, {"step": 4, "a": 2.5}]
    assert series(recs, "a") == ([1, 4], [1.0, 2.5])


def test_errors_name_the_run_or_metric(runs, tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "nope: no metrics.jsonl" in capsys.readouterr().err
    assert main([*runs, "--metrics", "reward,entropy", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no run logged entropy" in err and "available: accuracy, kl, reward" in err
    assert list(load_runs([runs[0], runs[0], runs[0]])) == ["skpo", runs[0], f"{runs[0]} #2"]
