"""``skpo-analyze bypass-curve``: does SKPO's downstream learn to use the segment as training goes on?

The shortcut analysis (:mod:`.shortcut`) of one SKPO run's saved checkpoints, step by step: the
starting model (step 0, the run's ``model.hf_path`` or ``--base``) and every complete checkpoint
under the run's checkpoint directory. Everything that defines the measurement comes from the run's
own ``config.yaml``, so the curve measures what that run trained on: the held-out problems
(``data.eval``; ``--offset``/``--limit`` select among them), the prompt template, the skip text
(``algo.skpo.skip_template`` or the template's own), the response cap
(``rollout.max_response_tokens``), the temperature and the answer extractors
(``reward.answer_fallbacks``).

Each step's full shortcut result goes to ``<out>/step_<N>/`` and is reused when the command runs
again (a long curve can be stopped and resumed); ``bypass_curve.json``, ``.md`` and ``.png`` hold
the curve: per step the accuracy, the zero-advantage rate and the bypass rate of ``q``, the skip
prompt [s, q] and the hard prefix. A skip bypass rate that falls towards the hard prefix's means the
downstream group follows the segment; one that stays at ``q``'s means it ignores it.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from megatron_skpo.analysis.sampling import AnalysisError, Decoding, TaskSpec
from megatron_skpo.analysis.shortcut import ShortcutResult

CONDITIONS = ("q", "skip", "hard_prefix")
STATS = ("accuracy", "zero_adv_rate", "bypass_rate")


@dataclass(frozen=True)
class RunSpec:
    """What a run's config fixes about the measurement."""

    task: TaskSpec
    decoding: Decoding
    skip_text: str
    extractors: tuple[str, ...]
    base_model: str
    checkpoint_root: Path


def run_spec(run_dir: Path, *, offset: int = 0, limit: Optional[int] = None, seed: int = 0,
             base: Optional[str] = None) -> RunSpec:
    """Read ``run_dir/config.yaml`` (the trainer's resolved config) into the measurement's settings."""
    from megatron_skpo.config import ConfigError, load_resolved
    from megatron_skpo.data.prompts import get_template

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise AnalysisError(f"--run {run_dir}: no config.yaml (pass the logging.dir of an skpo-train run)")
    try:
        cfg = load_resolved(path)
    except ConfigError as e:
        raise AnalysisError(f"--run {run_dir}: {path} does not load: {e}") from None
    if cfg.algo.name != "skpo":
        raise AnalysisError(f"--run {run_dir}: algo.name is {cfg.algo.name!r}; the bypass curve measures SKPO runs")
    ev = cfg.data.eval
    if ev is None or ev.format != "fields":
        raise AnalysisError(f"--run {run_dir}: data.eval must be a built-in recipe or a file read by fields "
                            "(the held-out problems the curve is measured on)")
    task = TaskSpec(ev.name or str(ev.path), limit, ev.offset + offset, cfg.data.prompt_template,
                    cfg.data.use_chat_template, ev.prompt_field, ev.answer_field or "answer",
                    cfg.rollout.max_prompt_tokens)
    r = cfg.rollout
    decoding = Decoding(r.temperature, r.top_p, r.max_response_tokens, seed, "auto",
                        r.max_model_len or r.max_prompt_tokens + r.max_response_tokens)
    skip = cfg.algo.skpo.skip_template or get_template(cfg.data.prompt_template).skip
    # the run directory is the run's logging.dir: its checkpoints are under it unless checkpoint.dir moved them
    root = run_dir / "checkpoints" if cfg.checkpoint.dir is None else Path(cfg.checkpoint.dir)
    return RunSpec(task, decoding, skip, tuple(cfg.reward.answer_fallbacks), base or cfg.model.hf_path, root)


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, model directory) of every complete checkpoint under ``root``, oldest first."""
    from megatron_skpo.trainer.checkpoint import CheckpointManager

    found = [(c.step, c.path / "model") for c in CheckpointManager(root, 0, 1, barrier=lambda: None,
                                                                   gather=None).complete()]
    missing = [str(p) for _, p in found if not p.is_dir()]
    if missing:
        raise AnalysisError(f"checkpoints without a model part: {', '.join(missing)}")
    return found


@dataclass
class BypassCurve:
    run: str
    settings: dict
    steps: list[int] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # per step: {"step", "base_accuracy", "<cond>/<stat>", ...}

    def as_dict(self) -> dict:
        return {"run": self.run, "settings": self.settings, "rows": self.rows}


def curve_row(step: int, result: ShortcutResult) -> dict:
    """One step of the curve from its shortcut result (the overall row of each condition)."""
    row = {"step": step, "base_accuracy": result.base["accuracy"], "segments": result.base["segments"]}
    for cond in CONDITIONS:
        stats = result.overall(cond)
        row.update({f"{cond}/{s}": getattr(stats, s) for s in STATS})
        row[f"{cond}/bypass_groups"] = stats.bypass_groups
    return row


def run_bypass_curve(run_dir: Path, out: Path, spec: RunSpec, *, group_size: int = 8, positions: int = 3,
                     steps: Optional[list[int]] = None, workers: int = 2, grading_timeout: float = 5.0,
                     progress: bool = True,
                     shortcut_fn: Optional[Callable[..., ShortcutResult]] = None) -> BypassCurve:
    """The shortcut analysis at step 0 and at every checkpoint (or those in ``steps``)."""
    from megatron_skpo.analysis import shortcut
    from megatron_skpo.eval import resolve_model

    shortcut_fn = shortcut_fn or shortcut.run_shortcut
    saved = checkpoints(spec.checkpoint_root)
    if not saved:
        raise AnalysisError(f"--run {run_dir}: no complete checkpoint under {spec.checkpoint_root}; train with "
                            "checkpoint.save_interval > 0 and checkpoint.keep_last large enough to keep them")
    points = [(0, Path(spec.base_model))] + saved
    if steps is not None:
        unknown = sorted(set(steps) - {s for s, _ in points})
        if unknown:
            raise AnalysisError(f"--steps {unknown}: no such checkpoint under {spec.checkpoint_root} "
                                f"(have {[s for s, _ in points]})")
        points = [(s, p) for s, p in points if s in steps]
    settings = {"group_size": group_size, "positions": positions, "skip_text": spec.skip_text,
                "extractors": list(spec.extractors), "base_model": spec.base_model}
    curve = BypassCurve(str(run_dir), settings)
    for step, model in points:
        step_out = out / f"step_{step:08d}"
        done = step_out / "shortcut.json"
        if done.is_file():  # resume: this step was measured by an earlier call
            result = ShortcutResult.from_dict(json.loads(done.read_text()))
            _check_same(done, result.settings, spec, group_size, positions)
        else:
            with tempfile.TemporaryDirectory(prefix="skpo-bypass-") as tmp:
                hf = resolve_model(model, cache_dir=tmp, like=spec.base_model)
                result = shortcut_fn(str(hf), spec.task, spec.decoding, group_size=group_size, positions=positions,
                                     skip_texts=[spec.skip_text], extractors=spec.extractors, workers=workers,
                                     grading_timeout=grading_timeout, out=step_out, progress=progress)
            result.settings["model"] = str(model)
            shortcut.write(result, step_out)
        curve.steps.append(step)
        curve.rows.append(curve_row(step, result))
        write(curve, out)  # after every step: a stopped curve keeps what it measured
    return curve


def _check_same(path: Path, earlier: dict, spec: RunSpec, group_size: int, positions: int) -> None:
    """A step measured by an earlier call is reused only if it was measured the same way."""
    now = {"group_size": group_size, "positions": positions, "limit": spec.task.limit, "offset": spec.task.offset,
           "seed": spec.decoding.seed, "dataset": spec.task.dataset}
    diff = {k: (earlier.get(k), v) for k, v in now.items() if earlier.get(k) != v}
    if diff:
        said = ", ".join(f"{k}: {a} there, {b} now" for k, (a, b) in diff.items())
        raise AnalysisError(f"{path} was measured with other settings ({said}); pass another --out, or the same "
                            "settings to resume")


def markdown(curve: BypassCurve) -> str:
    lines = ["Shortcut analysis along training (held-out problems; bypass = share of a group's answers that "
             "differ from the segment's own answer):", "",
             "| step | q acc | [s, q] acc | hard prefix acc | q zero-adv | [s, q] zero-adv | q bypass | [s, q] bypass "
             "| hard prefix bypass | segments |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in curve.rows:
        lines.append(f"| {r['step']} | {r['q/accuracy']:.3f} | {r['skip/accuracy']:.3f} | "
                     f"{r['hard_prefix/accuracy']:.3f} | {r['q/zero_adv_rate']:.3f} | {r['skip/zero_adv_rate']:.3f} | "
                     f"{r['q/bypass_rate']:.3f} | {r['skip/bypass_rate']:.3f} | {r['hard_prefix/bypass_rate']:.3f} | "
                     f"{r['segments']} |")
    return "\n".join(lines) + "\n"


def plot(curve: BypassCurve, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"q": "q alone", "skip": "[s, q] (skip)", "hard_prefix": "hard prefix"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, stat, label in ((axes[0], "bypass_rate", "bypass rate"), (axes[1], "accuracy", "accuracy")):
        for cond in CONDITIONS:
            ax.plot(curve.steps, [r[f"{cond}/{stat}"] for r in curve.rows], marker="o", label=names[cond])
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(curve: BypassCurve, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bypass_curve.json").write_text(json.dumps(curve.as_dict(), indent=2) + "\n")
    (out / "bypass_curve.md").write_text(markdown(curve))
    plot(curve, out / "bypass_curve.png")
