"""Checks before anything heavy starts: one line per problem, nothing written."""
import json
from pathlib import Path

import pytest

from megatron_skpo.config import load_config
from megatron_skpo.trainer.preflight import preflight, set_aside
from fake_weights import header_only_weights


@pytest.fixture
def model(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"num_attention_heads": 9, "num_key_value_heads": 3,
                                               "intermediate_size": 1536, "num_hidden_layers": 30}))
    header_only_weights(d, 30)
    return d


def cfg(tmp_path, model, *overrides):
    return load_config(None, [f"model.hf_path={model}", "data.train.name=mawps_easy", "parallel.tp=1",
                              f"logging.dir={tmp_path / 'run'}", *overrides])


def test_a_good_run_has_no_problem(tmp_path, model):
    assert preflight(cfg(tmp_path, model)) == []


@pytest.mark.parametrize("overrides, world, needle", [
    (["parallel.tp=3"], 1, "parallel.tp x parallel.pp = 3 x 1 does not divide the world size 1"),
    (["parallel.tp=2"], 2, "parallel.tp = 2 does not divide the model's num_attention_heads=9, num_key_value_heads=3"),
    (["parallel.pp=4"], 4, "parallel.pp = 4 does not divide the model's num_hidden_layers=30"),
    (["rollout.tp=2"], 2, "rollout.tp = 2 does not divide the model's num_attention_heads=9"),
    (["data.train.name=nope"], 1, "data.train.name: unknown dataset recipe 'nope'"),
    (["data.train.name=null", "data.train.path=/no/such.jsonl"], 1, "data.train.path: no such file /no/such.jsonl"),
    (["data.eval.path=/no/eval.jsonl"], 1, "data.eval.path: no such file /no/eval.jsonl"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_problems_name_the_field(tmp_path, model, overrides, world, needle):
    problems = preflight(cfg(tmp_path, model, *overrides), world_size=world)
    assert any(needle in p for p in problems), problems


def test_model_mcore_path_needs_a_dist_checkpoint_and_no_hf_weights(tmp_path, model):
    (model / "model.safetensors").unlink()  # config.json and the tokenizer are all hf_path must hold
    root = tmp_path / "mcore"
    (root / "release").mkdir(parents=True)
    problems = preflight(cfg(tmp_path, model, f"model.mcore_path={root}"))
    assert problems == [f"model.mcore_path: {root} is neither a dist checkpoint (metadata.json) nor a Megatron "
                        "checkpoint root (latest_checkpointed_iteration.txt); an `skpo-convert hf-to-mcore` output "
                        "is expected"]
    (root / "latest_checkpointed_iteration.txt").write_text("release\n")
    problems = preflight(cfg(tmp_path, model, f"model.mcore_path={root}"))
    assert problems == [f"model.mcore_path: {root / 'latest_checkpointed_iteration.txt'} points at "
                        f"{root / 'release'}, which holds no dist checkpoint"]
    (root / "release" / "metadata.json").write_text("{}")
    assert preflight(cfg(tmp_path, model, f"model.mcore_path={root}")) == []
    assert "has no *.safetensors weights" in preflight(cfg(tmp_path, model))[0]


def test_missing_model_directory(tmp_path):
    problems = preflight(load_config(None, [f"model.hf_path={tmp_path}/none", "data.train.name=mawps_easy",
                                            "parallel.tp=1"]))
    assert problems == [f"model.hf_path: {tmp_path}/none has no config.json (an HF checkpoint directory is needed)"]


def test_a_fresh_start_never_overwrites_a_previous_run(tmp_path, model):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert preflight(cfg(tmp_path, model)) == []  # checkpoint.resume=true: a resume
    (problem,) = preflight(cfg(tmp_path, model, "checkpoint.resume=false"))
    assert f"logging.dir: {run} holds a previous run" in problem and "--overwrite" in problem
    assert preflight(cfg(tmp_path, model, "checkpoint.resume=false"), overwrite=True) == []
    (moved,) = set_aside(cfg(tmp_path, model))
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()  # the directory (and a lock file) stays
    assert (moved / "metrics.jsonl").is_file() and moved.name.startswith("run.replaced-")


def test_metrics_without_a_checkpoint_are_not_silently_truncated(tmp_path, model):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    (problem,) = preflight(cfg(tmp_path, model))
    assert "it has no checkpoint to resume from" in problem


@pytest.mark.parametrize("target, needle", [
    ("{run}", "is, holds or lies in logging.dir"),
    ("{tmp}", "is, holds or lies in logging.dir"),
    ("{run}/checkpoints", "is, holds or lies in the checkpoint directory"),
    ("{model}", "is, holds or lies in model.hf_path"),
    ("{model}/sub", "is, holds or lies in model.hf_path"),
])
def test_export_never_replaces_the_run_or_the_input(tmp_path, model, target, needle):
    out = target.format(run=tmp_path / "run", tmp=tmp_path, model=model)
    assert any(needle in p for p in preflight(cfg(tmp_path, model), export_hf=out))


def test_export_into_a_non_empty_directory_needs_the_switch(tmp_path, model):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    (problem,) = preflight(cfg(tmp_path, model), export_hf=str(out))
    assert "is not empty" in problem and "checkpoint.export_overwrite=true" in problem
    assert preflight(cfg(tmp_path, model, "checkpoint.export_overwrite=true"), export_hf=str(out)) == []
    assert preflight(cfg(tmp_path, model), export_hf=str(tmp_path / "run" / "hf")) == []  # inside the run: fine


def test_layouts_that_cannot_shard_the_step(tmp_path, model):
    (p,) = preflight(cfg(tmp_path, model, "train.prompts_per_step=6", "train.mini_batch_prompts=1"), world_size=2)
    assert "train.mini_batch_prompts = 1 is below the data-parallel size 2" in p
    assert preflight(cfg(tmp_path, model, "train.prompts_per_step=6", "train.mini_batch_prompts=3"), world_size=2) == []
    problems = preflight(cfg(tmp_path, model, "rollout.tp=2"), world_size=3)
    assert any("rollout.tp = 2 does not divide the world size 3" in p for p in problems)
    assert any("rollout.tp = 2 does not divide parallel.tp = 1" in p for p in problems)


def test_reward_needs_what_the_data_gives(tmp_path, model):
    """The code reward on a dataset without tests, multiple choice without answers, and a custom reward
    that does not import or cannot take (response, reference): one line each, naming what to set."""
    data = tmp_path / "code.jsonl"
    data.write_text(json.dumps({"question": "print 1", "tests": [{"input": "", "output": "1"}], "sol": "1"}) + "\n")
    code = ["reward.kind=code", "reward.timeout_s=30", "data.train.name=null", f"data.train.path={data}",
            "data.train.prompt_field=question"]
    problems = preflight(cfg(tmp_path, model, *code, "data.train.answer_field=sol"))
    assert problems == ["data.train: reward.kind 'code' needs tests, which 1 of the first 1 problems lack: set "
                        "data.train.tests_field (or format: livecodebench / taco)"]
    assert preflight(cfg(tmp_path, model, *code, "data.train.answer_field=null", "data.train.tests_field=tests")) == []
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def score(response):\n    return 1.0\n")
    problems = preflight(cfg(tmp_path, model, "reward.kind=custom", f"reward.custom={bad}:score"))
    assert len(problems) == 1 and problems[0].startswith("reward.custom: score(response) cannot be called as fn(")
    problems = preflight(cfg(tmp_path, model, "reward.kind=custom", f"reward.custom={tmp_path}/none.py:score"))
    assert problems == [f"reward.custom: no such file {tmp_path}/none.py (from '{tmp_path}/none.py:score')"]
