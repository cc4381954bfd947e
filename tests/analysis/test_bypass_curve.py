"""``skpo-analyze bypass-curve``: what it reads from a run and the errors a wrong run gets (the
measurement itself runs end to end in tests/trainer/test_bench_learn.py on a trained tiny run)."""
from pathlib import Path

import pytest

from megatron_skpo.analysis.bypass_curve import run_bypass_curve, run_spec
from megatron_skpo.analysis.sampling import AnalysisError
from megatron_skpo.config import dump_config, load_config, load_resolved

ROOT = Path(__file__).resolve().parents[2]


def write_run(run: Path, recipe: str, *overrides: str) -> Path:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(load_config(ROOT / recipe, list(overrides))))
    return run


def test_the_measurement_is_the_runs_own(tmp_path):
    run = write_run(tmp_path / "run", "configs/demo_cpu.yaml", "algo.skpo.skip_template='[{segment}] {problem}'",
                    "rollout.max_response_tokens=48")
    spec = run_spec(run, offset=5, limit=10, seed=3)
    assert (spec.task.dataset, spec.task.offset, spec.task.limit) == ("mawps_easy", 64 + 5, 10)
    assert spec.task.prompt_template == "fewshot_plain" and not spec.task.use_chat_template
    assert (spec.decoding.max_tokens, spec.decoding.temperature, spec.decoding.seed) == (48, 0.6, 3)
    assert spec.skip_text == "[{segment}] {problem}" and spec.extractors == ("the_answer_is", "last_number")
    assert spec.checkpoint_root == run / "checkpoints" and spec.base_model == ".cache/smollm2-135m-instruct"
    # a run's config.yaml holds every key, so it is read back as a resolved config, not as a recipe
    assert load_resolved(run / "config.yaml").algo.skpo.skip_template == "[{segment}] {problem}"
    with pytest.raises(Exception, match="batch_norm_level"):
        load_config(run / "config.yaml")


def test_wrong_runs_are_named(tmp_path):
    with pytest.raises(AnalysisError, match="no config.yaml"):
        run_spec(tmp_path)
    grpo = write_run(tmp_path / "grpo", "configs/demo_cpu.yaml", "algo.name=grpo")
    with pytest.raises(AnalysisError, match="algo.name is 'grpo'"):
        run_spec(grpo)
    bare = write_run(tmp_path / "bare", "configs/demo_cpu.yaml")
    with pytest.raises(AnalysisError, match="no complete checkpoint under .*checkpoint.save_interval"):
        run_bypass_curve(bare, tmp_path / "out", run_spec(bare))
    (bare / "checkpoints" / "step_00000004").mkdir(parents=True)  # partial: no COMPLETE marker
    with pytest.raises(AnalysisError, match="no complete checkpoint"):
        run_bypass_curve(bare, tmp_path / "out", run_spec(bare))


def test_steps_must_name_saved_checkpoints(tmp_path):
    run = write_run(tmp_path / "run", "configs/demo_cpu.yaml")
    step = run / "checkpoints" / "step_00000004"
    (step / "model").mkdir(parents=True)
    (step / "COMPLETE").write_text("{}")
    with pytest.raises(AnalysisError, match=r"--steps \[8\]: no such checkpoint .*have \[0, 4\]"):
        run_bypass_curve(run, tmp_path / "out", run_spec(run), steps=[4, 8])
