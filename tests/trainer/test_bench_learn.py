"""``skpo-bench learn --quick`` end to end on a tiny model: every method family's special case (SPO's
prompts per step, dense MC's K and M), one seed, results JSON, table and curves."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from loop_child import build_assets  # noqa: E402

from megatron_skpo.bench.learn import (aggregate, at_step, common_step, markdown, method_overrides,  # noqa: E402
                                       parse_variant, resolve_methods, run)

ROOT = Path(__file__).resolve().parents[2]


def test_method_overrides_keep_rows_per_step_equal():
    class A:
        dense_mc_k, dense_mc_m = 3, 2

    assert method_overrides("grpo", A, 8, 8) == ["algo.name=grpo"]
    assert method_overrides("spo", A, 8, 8) == ["algo.name=spo", "train.prompts_per_step=64",
                                                "train.mini_batch_prompts=64"]
    assert method_overrides("dense_mc", A, 8, 8)[1:] == ["algo.dense_mc.num_rollouts=3", "algo.dense_mc.num_positions=2"]


def test_aggregate_and_table_hand_worked():
    one = {"start": 0.3, "steps": 10, "seconds": 60.0, "step_seconds": 5.0}
    runs = {"grpo": {0: {**one, "final": 0.5, "gain": 0.2, "tokens_per_step": 1000.0,
                         "phase_tokens_per_step": {"single": 1000.0}},
                     1: {**one, "final": 0.4, "gain": 0.1, "steps": 12, "seconds": 120.0, "step_seconds": 7.0,
                         "tokens_per_step": 1400.0, "phase_tokens_per_step": {"single": 1400.0}}},
            "skpo": {0: {**one, "final": 0.4, "gain": 0.1, "tokens_per_step": 2000.0,
                         "phase_tokens_per_step": {"downstream": 1000.0, "upstream": 300.0,
                                                   "upstream_discarded": 700.0}}}}
    agg = aggregate(runs)
    grpo = agg["grpo"]
    assert grpo["final_mean"] == pytest.approx(0.45) and grpo["gain_mean"] == pytest.approx(0.15)
    assert grpo["gain_min"] == pytest.approx(0.1) and grpo["minutes_mean"] == pytest.approx(1.5)
    assert grpo["tokens_per_step"] == 1200.0
    table = markdown(agg, "val/avg@4", 1000)
    assert "| grpo | 2 | 30.0 | 45.0 (7.1) | +15.0 (7.1) | +10.0..+20.0 | 11.0 | 1,200 | 6 | 1.5 |" in table
    assert "Sampled tokens a step by phase: skpo: downstream 1,000, upstream 300, upstream_discarded 700." in table


def test_equal_steps_column_hand_worked():
    """Validated at steps 0, 4, 8 (GRPO, two seeds) and 0, 4, 6 (SKPO, a shorter run): the last step
    every run has is 4; GRPO's values there 0.4 and 0.5 (mean 45.0, std 7.1), SKPO's 0.3."""
    runs = {"grpo": {0: {"curve_steps": [(0, 0.3), (4, 0.4), (8, 0.6)]}, 1: {"curve_steps": [(0, 0.3), (4, 0.5), (8, 0.5)]}},
            "skpo": {0: {"curve_steps": [(0, 0.3), (4, 0.3), (6, 0.35)]}}}
    assert common_step(runs) == 4
    equal = at_step(runs, 4)
    assert equal["grpo"][0] == pytest.approx(0.45) and equal["skpo"] == (0.3, 0.0)
    one = {"start": 0.3, "final": 0.4, "gain": 0.1, "steps": 8, "seconds": 60.0, "step_seconds": 5.0,
           "tokens_per_step": 1000.0, "phase_tokens_per_step": {"single": 1000.0}}
    agg = aggregate({"grpo": {0: one, 1: one}, "skpo": {0: one}})
    table = markdown(agg, "val/avg@4", 1000, 4, equal)
    assert "| method | seeds | start | final | gain | gain min..max | at step 4 | steps |" in table
    assert "| grpo | 2 | 30.0 | 40.0 (0.0) | +10.0 (0.0) | +10.0..+10.0 | 45.0 (7.1) | 8.0 |" in table


def test_variant_names_an_ablation():
    v = parse_variant("skpo_wup0.25=skpo:algo.skpo.w_up=0.25, algo.skpo.w_down=0.75")
    assert (v.name, v.method, v.overrides) == ("skpo_wup0.25", "skpo", ("algo.skpo.w_up=0.25", "algo.skpo.w_down=0.75"))
    methods = resolve_methods("grpo,skpo_wup0.25", [v])
    assert methods["grpo"].overrides == () and methods["skpo_wup0.25"] is v
    for bad in ("skpo:algo.skpo.w_up=0.25", "x=skpo", "x=skpo:w_up", "a/b=skpo:algo.skpo.w_up=1",
                "grpo=skpo:algo.skpo.w_up=1", "x=Skpo!:algo.skpo.w_up=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="--variant"):
            parse_variant(bad)


def test_a_bad_variant_fails_before_the_first_run(tmp_path):
    bad = parse_variant("skpo_bad=skpo:algo.skpo.w_up=-1")
    with pytest.raises(SystemExit, match="skpo_bad: .*w_up"):
        run(_args(tmp_path, methods="grpo,skpo_bad", variant=[bad], report=False))
    assert not (tmp_path / "out" / "grpo").exists()  # nothing trained


def _args(tmp_path, **kw):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    base = dict(model=str(model), recipe="configs/demo_cpu.yaml", methods="skpo,grpo", seeds="0,1",
                token_budget=40_000, out=str(tmp_path / "out"), report=True, quick=False, variant=[], merge=[],
                overrides=[], max_steps=200, eval_every=4, dense_mc_k=2, dense_mc_m=2)
    return argparse.Namespace(**{**base, **kw})


def test_merge_takes_an_earlier_machines_runs(tmp_path, capsys):
    earlier = ROOT / "docs" / "results" / "learn40k" / "results_xeon.json"  # seeds 0, 1 of the first machine
    committed = json.loads(earlier.read_text())
    # seed 1 of GRPO finished here: it wins over the merged file's
    here = tmp_path / "out" / "grpo" / "seed1"
    here.mkdir(parents=True)
    (here / "DONE").write_text('{"seconds": 60.0}\n')
    records = [{"step": 0, "sampled_tokens": 0.0, "val/avg@4": 0.25, "val/pass@4": 0.5},
               {"step": 1, "sampled_tokens": 1000.0, "rollout/generated_tokens_all": 1000.0, "time/step": 2.0,
                "accuracy": 0.5, "tokens/single": 1000.0, "val/avg@4": 0.5, "val/pass@4": 0.75}]
    (here / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = run(_args(tmp_path, merge=[str(earlier)]))
    assert summary["methods"]["skpo"]["final_mean"] == pytest.approx(committed["methods"]["skpo"]["final_mean"])
    assert summary["merged"] == {"skpo": {"0": str(earlier), "1": str(earlier)}, "grpo": {"0": str(earlier)}}
    grpo = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]["grpo"]
    assert grpo["1"]["final"] == 0.5 and "merged_from" not in grpo["1"]
    assert grpo["0"]["final"] == committed["runs"]["grpo"]["0"]["final"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| grpo | 1 | 25.0 | 50.0 | 1 | 1,000 | this |" in table and "| skpo | 0 | 35.4 | 37.9 | 19 | 2,123 | " \
        "results_xeon.json |" in table  # no equal step here: seed 1 of GRPO validated at steps 0 and 1 only
    assert f"Taken from {earlier} (--merge): skpo seed 0, skpo seed 1, grpo seed 0." in table
    other_k = tmp_path / "avg16.json"
    other_k.write_text(json.dumps({**committed, "runs": {"grpo": {"0": {**committed["runs"]["grpo"]["0"],
                                                                      "metric": "val/avg@16"}}}}))
    with pytest.raises(SystemExit, match="different metrics"):  # its seed 0 beside this machine's seed 1
        run(_args(tmp_path, merge=[str(other_k)], methods="grpo", seeds="0,1"))
    with pytest.raises(SystemExit, match="token_budget is 40000"):
        run(_args(tmp_path, merge=[str(earlier)], token_budget=16_000))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(SystemExit, match=f"--merge {bad}: cannot read"):
        run(_args(tmp_path, merge=[str(bad)]))


@pytest.mark.slow
def test_quick_bench_end_to_end(tmp_path):
    model = build_assets(tmp_path)
    data = tmp_path / "problems.jsonl"
    over = [f"data.train.path={data}", "data.train.name=null", "data.train.prompt_field=prompt",
            "data.train.answer_field=reward_model.ground_truth", "data.train.limit=8", f"data.eval.path={data}",
            "data.eval.name=null", "data.eval.prompt_field=prompt", "data.eval.answer_field=reward_model.ground_truth",
            "data.eval.offset=8", "data.prompt_template=raw", "data.use_chat_template=true", "model.dtype=fp32",
            "rollout.dtype=float32", "rollout.max_prompt_tokens=64", "rollout.max_response_tokens=12",
            "rollout.max_model_len=256",
            "train.prompts_per_step=2", "train.mini_batch_prompts=2", "algo.group_size=2",
            "reward.answer_fallbacks=[last_number]", "reward.workers=1", "logging.tensorboard=false"]
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pool = "skpo_pool=skpo:algo.skpo.phase_weighting=token_pool,algo.skpo.upstream_agg_mode=token-mean"
    cmd = [sys.executable, "-m", "megatron_skpo.cli.bench", "learn", "--quick", "--model", str(model),
           "--methods", "skpo,spo,dense_mc,skpo_pool", "--variant", pool, "--seeds", "0", "--out", str(out), *over]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["methods"]) == {"skpo", "spo", "dense_mc", "skpo_pool"} and summary["metric"] == "val/avg@1"
    # the variant trained SKPO with its own overrides, and only the variant did
    pooled = (out / "skpo_pool" / "seed0" / "config.yaml").read_text()
    assert "phase_weighting: token_pool" in pooled
    assert "phase_weighting: fixed" in (out / "skpo" / "seed0" / "config.yaml").read_text()
    assert summary["variants"] == {"skpo_pool": {"method": "skpo", "overrides": pool.split(":", 1)[1].split(",")}}
    results = json.loads((out / "results.json").read_text())
    for method, runs in results["runs"].items():
        run = runs["0"]
        assert run["steps"] == 1 and run["curve"][0][0] == 0 and run["curve"][-1][0] == run["sampled_tokens"] > 0
        assert [s for s, _ in run["curve_steps"]] == [0, 1]
        assert sum(run["phase_tokens_per_step"].values()) == run["tokens_per_step"] == run["sampled_tokens"]
    assert set(results["runs"]["skpo"]["0"]["phase_tokens_per_step"]) == {"upstream", "upstream_discarded", "downstream"}
    spo = [json.loads(line) for line in (out / "spo" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert spo[-1]["rollout/generated_tokens"] > 0 and spo[-1]["loss/seqs"] == 4  # 2 prompts x G=2 -> 4 x 1
    assert (out / "curves.png").stat().st_size > 10_000 and "| skpo | 1 |" in (out / "table.md").read_text()
    # a finished run is not repeated: the second call only reads the results
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1]) == summary
    # --report trains nothing: GRPO has no finished run, so it is listed as missing and left out
    report = subprocess.run([*cmd[:cmd.index("--methods") + 1], "skpo,grpo", *cmd[cmd.index("--methods") + 2:],
                             "--report"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert report.returncode == 0 and "grpo seed 0: not finished, left out" in report.stderr
    assert set(json.loads(report.stdout.strip().splitlines()[-1])["methods"]) == {"skpo"}
    assert not (out / "grpo").exists() and json.loads((out / "results.json").read_text())["equal_step"] == 1
    _bypass_curve_of_the_skpo_run(out / "skpo" / "seed0", tmp_path / "bypass", data, env)


def _bypass_curve_of_the_skpo_run(run: Path, out: Path, data: Path, env: dict) -> None:
    """``skpo-analyze bypass-curve`` on the SKPO run: step 0 (its base model) and its final checkpoint,
    measured on the run's own held-out problems, template and response cap; a rerun reuses both."""
    cmd = [sys.executable, "-m", "megatron_skpo.cli.analyze", "bypass-curve", "--run", str(run), "--limit", "3",
           "--positions", "1", "--group-size", "2", "--workers", "1", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = json.loads((out / "bypass_curve.json").read_text())
    assert [r["step"] for r in curve["rows"]] == [0, 1] and (out / "bypass_curve.png").stat().st_size > 10_000
    step1 = json.loads((out / "step_00000001" / "shortcut.json").read_text())["settings"]
    assert (step1["dataset"], step1["offset"], step1["limit"]) == (str(data), 8, 3)  # data.eval.offset=8
    assert step1["max_tokens"] == 12 and step1["model"].endswith("step_00000001/model")
    assert all(0 <= r[f"{c}/accuracy"] <= 1 for r in curve["rows"] for c in ("q", "skip", "hard_prefix"))
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert again.returncode == 0 and json.loads((out / "bypass_curve.json").read_text()) == curve
    other = subprocess.run([*cmd[:-2], "--seed", "1", "--out", str(out)], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=120)
    assert other.returncode == 2 and "measured with other settings (seed: 0 there, 1 now)" in other.stderr
    # the run's checkpoint root names its latest checkpoint, which exports with the config it started from
    from megatron_skpo.eval import resolve_model

    hf = resolve_model(run / "checkpoints", cache_dir=out / "export")
    assert json.loads((hf / "config.json").read_text())["vocab_size"] > 0 and (hf / "tokenizer.json").is_file()
