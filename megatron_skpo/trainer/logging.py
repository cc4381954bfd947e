"""Per-step metrics sinks: JSONL, TensorBoard, W&B (optional), and a progress bar with ETA.

``MetricsLogger(cfg, total_steps, resume_step)`` opens the sinks ``LoggingConfig`` enables in
``cfg.dir``. Resuming from the checkpoint of step ``s`` cuts ``metrics.jsonl`` back to the lines with
``step <= s`` (and a line cut short by a kill), and TensorBoard purges events after ``s``, so a resumed
run's metrics file equals the uninterrupted run's. Only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from megatron_skpo.config.train import LoggingConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class LoggingSetupError(RuntimeError):
    """A sink that the config enables cannot start; the message names the config field."""


def _scalar(v: Any) -> Any:
    """Tensors and NumPy scalars -> Python numbers; non-finite floats -> None (valid JSON)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a last line cut short by a kill is ignored, other bad lines raise."""
    path = Path(path)
    lines = path.read_text().split("\n")
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # the unterminated last line of a killed writer
                break
            raise ValueError(f"{path}:{i}: not a JSON line: {e}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise ValueError(f"{path}:{i}: each line must be an object with an integer 'step'")
        records.append(rec)
    return records


class JsonlSink:
    """Appends one JSON object per step, flushed per line."""

    def __init__(self, path: str | Path, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._truncate(resume_step)
        self._f = open(self.path, "a")

    def _truncate(self, resume_step: int) -> None:
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._f.write(json.dumps({"step": step, **{k: _scalar(v) for k, v in metrics.items()}}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardSink:
    """``SummaryWriter`` scalars under ``<dir>/tb``; a resume purges events after the resumed step."""

    def __init__(self, log_dir: str | Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # purge the events after the resumed step (after none: a fresh start replaces every earlier event)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1 if resume_step else 0)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        for k, v in metrics.items():
            v = _scalar(v)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Weights & Biases run that resumes under the id stored in ``<dir>/wandb_run_id``."""

    def __init__(self, wandb: Any, cfg: LoggingConfig, config: Optional[dict]):
        id_file = Path(cfg.dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, dir=cfg.dir, id=run_id,
                              resume="allow", config=config)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.run.log({k: _scalar(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_wandb(cfg: LoggingConfig, config: Optional[dict] = None) -> Optional[WandbSink]:
    """The W&B sink if ``logging.wandb``; a missing package warns or raises per ``logging.wandb_missing``."""
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError as e:
        where = f"project {cfg.wandb_project!r}" + (f", entity {cfg.wandb_entity!r}" if cfg.wandb_entity else "")
        msg = (f"logging.wandb is true ({where}) but the wandb package does not import ({e}); "
               f"`pip install wandb`, or set logging.wandb=false")
        if cfg.wandb_missing == "error":
            raise LoggingSetupError(msg + " (logging.wandb_missing=error)") from e
        log.warning("%s; continuing without W&B (logging.wandb_missing=warn)", msg)
        return None
    return WandbSink(wandb, cfg, config)


class ProgressBar:
    """A tqdm bar over the run's steps (ETA from the steps of this process), showing a few metrics."""

    def __init__(self, total_steps: int, start_step: int, shown: list[str], enabled: bool = True):
        from tqdm.auto import tqdm

        self.shown = shown
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not enabled, desc="train")

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        post = {k: f"{v:.4g}" for k in self.shown if isinstance(v := _scalar(metrics.get(k)), (int, float))}
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class StepLines:
    """One line per step on stdout: ``step 3/24 | reward -0.41 | accuracy 0.30 | val/avg@8 0.36 | ...``."""

    KEYS = ("reward", "accuracy", "sampled_tokens", "time/step")

    def __init__(self, total_steps: int):
        self.total = total_steps

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        shown = [k for k in self.KEYS if k in metrics] + sorted(k for k in metrics if k.startswith(("val/avg@",
                                                                                                    "val/pass@")))
        parts = [f"step {step}/{self.total}"] + [f"{k.removeprefix('time/')} {_fmt(metrics[k])}" for k in shown]
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        pass


def _fmt(v: Any) -> str:
    v = _scalar(v)
    if isinstance(v, float) and abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


class MetricsLogger:
    """Every enabled sink behind one ``log(step, metrics)``; rank != 0 logs nothing.

    Args:
        total_steps: steps of the whole run (the progress bar's total).
        resume_step: the step of the checkpoint the run resumed from (-1: a fresh start, whose
            records replace any a killed earlier start left).
        config: the resolved config as a dict, recorded by W&B.
    """

    def __init__(self, cfg: LoggingConfig, total_steps: int, resume_step: int = 0,
                 config: Optional[dict] = None, rank: int = 0):
        self.sinks: list[Any] = []
        self.progress: Optional[ProgressBar] = None
        if rank != 0:
            return
        run_dir = Path(cfg.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            self.sinks.append(JsonlSink(run_dir / METRICS_FILE, resume_step))
        if cfg.tensorboard:
            self.sinks.append(TensorBoardSink(run_dir / "tb", resume_step))
        wandb_sink = open_wandb(cfg, config)
        if wandb_sink is not None:
            self.sinks.append(wandb_sink)
        if cfg.lines:
            self.sinks.append(StepLines(total_steps))
        self.progress = ProgressBar(total_steps, max(resume_step, 0), cfg.progress_metrics, cfg.progress)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(step, metrics)
        if self.progress is not None:
            self.progress.update(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self.progress is not None:
            self.progress.close()
        self.sinks, self.progress = [], None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
