"""Child process of the loop tests: build a tiny model + data once, then train recipes on one engine.

Usage: ``loop_child.py WORKDIR [--arch ARCH] RUN [RUN ...]`` where RUN is
``name:algo:steps[:extra=override,...]`` (``;`` separates overrides that hold commas; ``{work}``
is WORKDIR); each run trains ``configs/<algo>.yaml`` with
:func:`tiny_overrides` and writes under WORKDIR/name. ``--arch`` picks the tiny model's
architecture (``llama``, the default, ``qwen3`` or ``qwen3_moe``; see
``rollout_fixtures.build_tiny_model``). The tiny model and data are built by the first call into
WORKDIR/model and reused afterwards.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent / "rollout"))

PROBLEMS = [(f"What is {a} + {b}?", str(a + b)) for a in range(1, 5) for b in range(1, 5)]
# code problems with stdin/stdout tests (reward.kind=code), and a custom reward (reward.kind=custom)
CODE = [(f"Read an integer n and print n + {k}.", [{"input": f"{n}\n", "output": f"{n + k}\n"} for n in (1, 5)])
        for k in range(1, 9)]
CUSTOM_REWARD = """def reward(response, reference):
    \"\"\"1 when the response mentions the gold answer, 0 when it has another digit, -1 without one.\"\"\"
    if reference["answer"] in response:
        return {"score": 1.0, "correct": True}
    return 0.0 if any(c.isdigit() for c in response) else -1.0
"""


def build_assets(work: Path, arch: str = "llama", kv_heads: int = 1) -> Path:
    """A tiny model of ``arch`` + tokenizer (rollout fixtures) and a dapo-format JSONL of 16 problems."""
    from rollout_fixtures import build_tiny_model

    model = work / "model"
    if not (model / "config.json").is_file():
        build_tiny_model(model, arch, eos_prob=0.05, kv_heads=kv_heads)
    data = work / "problems.jsonl"
    if not data.is_file():
        rows = [{"prompt": [{"role": "user", "content": q}], "reward_model": {"ground_truth": a}} for q, a in PROBLEMS]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = work / "code.jsonl"
    if not code.is_file():
        code.write_text("".join(json.dumps({"question": q, "tests": t}) + "\n" for q, t in CODE))
        (work / "reward_fn.py").write_text(CUSTOM_REWARD)
    return model


def tiny_overrides(work: Path, name: str, steps: int, algo: str = "skpo") -> list[str]:
    """The real recipe, shrunk: tiny fp32 model, 4 prompts x G=4, 16-token responses, 2 updates/step.

    Rewards: 1 correct, 0 wrong, -1 without a number (format penalty), so random text gives mixed groups.
    Family-specific knobs are set only for the family that reads them (the config rejects the rest).
    """
    from megatron_skpo.config import ALGORITHMS

    family = ALGORITHMS[algo].family
    own = {"skpo": ["algo.skpo.init_length=12"],
           "dense_mc": ["algo.dense_mc.num_rollouts=2", "algo.dense_mc.num_positions=2"],
           # the tiny model is rarely right: keep every group (the filter has its own tests)
           "prime": ["algo.prime.accuracy_lower=0", "algo.prime.accuracy_upper=1"]}.get(family, [])
    group = [] if family == "single_stream" else ["algo.group_size=4"]
    return own + group + [f"model.hf_path={work / 'model'}", "model.dtype=fp32", "parallel.tp=1", "parallel.pp=1",
            "parallel.micro_batch_tokens=512", "rollout.max_prompt_tokens=64", "rollout.max_response_tokens=16",
            "rollout.dtype=float32", "rollout.enforce_eager=true", "rollout.max_model_len=256",
            "rollout.temperature=1.0", f"train.steps={steps}", "train.prompts_per_step=4",
            "train.mini_batch_prompts=2", "train.seed=7", "optim.lr=1e-4", "optim.warmup_steps=0",
            f"data.train.path={work / 'problems.jsonl'}",
            "data.train.prompt_field=prompt", "data.train.answer_field=reward_model.ground_truth",
            "data.prompt_template=raw", "reward.correct=1", "reward.incorrect=0", "reward.format_penalty=-1",
            "reward.answer_fallbacks=[last_number]", "reward.workers=1", f"logging.dir={work / name}",
            "logging.tensorboard=false", "logging.progress=false", "checkpoint.save_interval=1",
            "checkpoint.keep_last=1"]


def track_config_reads(out: Path) -> set[tuple[str, str]]:
    """Record every (config class, field) read by code outside ``megatron_skpo.config`` (and outside
    ``dataclasses``, whose ``replace`` copies every field); the set is written to ``out`` at exit."""
    import atexit
    import dataclasses

    from megatron_skpo.config import Config
    from megatron_skpo.config.base import section_type

    reads: set[tuple[str, str]] = set()

    def install(cls) -> None:
        if "_tracked" in cls.__dict__:
            return
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _cls=cls.__name__, _names=names):
            if name in _names:
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if not caller.startswith(("megatron_skpo.config", "dataclasses")):
                    reads.add((_cls, name))
            return object.__getattribute__(self, name)

        cls.__getattribute__, cls._tracked = getattribute, True
        hints = __import__("typing").get_type_hints(cls)
        for f in dataclasses.fields(cls):
            sub = section_type(hints[f.name])
            if dataclasses.is_dataclass(sub):
                install(sub)

    install(Config)
    atexit.register(lambda: out.write_text(json.dumps(sorted(reads))))
    return reads


def main(work: str, runs: list[str]) -> int:
    import os

    from megatron_skpo.config import load_config
    from megatron_skpo.trainer.loop import train

    work_dir = Path(work)
    if os.environ.get("SKPO_TRACK_CONFIG_READS"):
        track_config_reads(Path(os.environ["SKPO_TRACK_CONFIG_READS"]))
    arch = "llama"
    if runs[:1] == ["--arch"]:
        arch, runs = runs[1], runs[2:]
    build_assets(work_dir, arch)
    engine = None
    for spec in runs:
        name, algo, steps, *extra = spec.split(":", 3)
        # overrides are split on ";" when any holds a comma (a YAML list), else on ","
        extra = extra[0].replace("{work}", str(work_dir)) if extra else ""
        extra = [e for e in extra.split(";" if ";" in extra else ",") if e]
        overrides = tiny_overrides(work_dir, name, int(steps), algo) + extra
        cfg = load_config(ROOT / "configs" / f"{algo}.yaml", overrides)
        if engine is None and len(runs) > 1:
            from megatron_skpo.trainer import build

            build.init_distributed()
            engine = build.build_engine(cfg, build.template_stop(cfg))
        rc = train(cfg, engine=engine)
        if rc:  # stopped by SIGTERM/SIGINT: the run's exit status, as skpo-train's
            return rc
        print(f"done {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
