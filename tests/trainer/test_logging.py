"""Metrics sinks: JSONL resume equals an uninterrupted run, TensorBoard purge, W&B absent, progress bar, guard."""
from __future__ import annotations

import logging
import math
import sys
import types

import pytest
import torch

from megatron_skpo.config.train import LoggingConfig
from megatron_skpo.trainer.guard import NonFiniteGuard, is_finite_update
from megatron_skpo.trainer.logging import (
    METRICS_FILE, JsonlSink, LoggingSetupError, MetricsLogger, read_metrics)


def metrics(step: int) -> dict:
    return {"reward": 0.1 * step, "accuracy": torch.tensor(step / 10), "loss": float("nan") if step == 2 else 1.0}


def cfg_for(tmp_path, **kw) -> LoggingConfig:
    return LoggingConfig(dir=str(tmp_path), **{"tensorboard": False, "progress": False, **kw})


def test_jsonl_resume_equals_uninterrupted(tmp_path):
    straight, resumed = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    sink = JsonlSink(straight)
    [sink.write(s, metrics(s)) for s in range(1, 6)]
    sink.close()
    sink = JsonlSink(resumed)
    [sink.write(s, metrics(s)) for s in range(1, 6)]  # ran to step 5, checkpoint was at step 3
    sink.close()
    with open(resumed, "a") as f:
        f.write('{"step": 6, "rew')  # killed mid-line
    sink = JsonlSink(resumed, resume_step=3)
    [sink.write(s, metrics(s)) for s in range(4, 6)]
    sink.close()
    assert resumed.read_bytes() == straight.read_bytes()
    recs = read_metrics(straight)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[1]["loss"] is None and recs[0]["accuracy"] == pytest.approx(0.1)  # NaN -> null, tensor -> float


def test_read_metrics_names_bad_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(path)
    path.write_text('{"reward": 1}\n')
    with pytest.raises(ValueError, match=r":1: .*integer 'step'"):
        read_metrics(path)


def test_tensorboard_resume_purges_later_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = cfg_for(tmp_path, tensorboard=True, jsonl=False)
    with MetricsLogger(cfg, total_steps=5) as ml:
        [ml.log(s, {"reward": float(s)}) for s in range(1, 6)]
    with MetricsLogger(cfg, total_steps=5, resume_step=3) as ml:
        [ml.log(s, {"reward": 10.0 * s}) for s in range(4, 6)]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_wandb_enabled_but_missing(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(LoggingSetupError, match="logging.wandb is true.*pip install wandb.*wandb_missing=error"):
        MetricsLogger(cfg_for(tmp_path, wandb=True, wandb_missing="error"), total_steps=3)
    with caplog.at_level(logging.WARNING):
        with MetricsLogger(cfg_for(tmp_path, wandb=True), total_steps=3) as ml:
            ml.log(1, metrics(1))
    assert "continuing without W&B" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_FILE)] == [1]


def test_wandb_sink_resumes_same_run(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(log=lambda m, step: calls.append(("log", step, m)), finish=lambda: calls.append("finish"))
    fake = types.SimpleNamespace(util=types.SimpleNamespace(generate_id=lambda: "abc123"),
                                 init=lambda **kw: calls.append(("init", kw)) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for step in (1, 2):
        with MetricsLogger(cfg_for(tmp_path, wandb=True, jsonl=False), total_steps=2, resume_step=step - 1) as ml:
            ml.log(step, {"reward": math.inf})
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [kw["id"] for kw in inits] == ["abc123", "abc123"] and inits[0]["resume"] == "allow"
    assert [c for c in calls if c[0] == "log"] == [("log", 1, {"reward": None}), ("log", 2, {"reward": None})]


def test_progress_bar_and_other_ranks(tmp_path):
    ml = MetricsLogger(cfg_for(tmp_path, progress=True), total_steps=10, resume_step=4)
    ml.log(5, metrics(5))
    bar = ml.progress.bar
    assert (bar.total, bar.n) == (10, 5) and bar.postfix == "reward=0.5, accuracy=0.5"
    ml.close()
    quiet = MetricsLogger(cfg_for(tmp_path / "r1"), total_steps=10, rank=1)
    quiet.log(1, metrics(1))
    assert quiet.sinks == [] and not (tmp_path / "r1").exists()


@pytest.mark.parametrize("loss,grad_norm,ok", [
    (1.0, 2.0, True),
    (float("nan"), 2.0, False),
    (1.0, float("inf"), False),
    (torch.tensor(1.0), torch.tensor(-math.inf), False),
    (torch.tensor([1.0, math.nan]), 1.0, False),  # any element
    (torch.tensor(0.5), 0, True),
], ids=["finite", "nan-loss", "inf-norm", "tensor-inf", "tensor-any-nan", "tensor-ok"])
def test_is_finite_update(loss, grad_norm, ok):
    assert is_finite_update(loss, grad_norm) is ok


def test_guard_counts_and_round_trips():
    g = NonFiniteGuard()
    assert [g.check(1.0, 1.0), g.check(math.nan, 1.0), g.check(1.0, math.inf)] == [True, False, False]
    assert g.metrics() == {"nonfinite/skipped": 2, "nonfinite/skipped_total": 2}
    assert g.metrics() == {"nonfinite/skipped": 0, "nonfinite/skipped_total": 2}
    h = NonFiniteGuard()
    h.load_state_dict(g.state_dict())
    assert h.skipped_total == 2
    with pytest.raises(ValueError, match="skipped_total"):
        h.load_state_dict({"skipped_total": -1})
