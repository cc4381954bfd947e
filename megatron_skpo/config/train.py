"""Optimizer, schedule, checkpointing and logging sections of the config tree."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from checkpoint_convert.sizes import parse_size
from megatron_skpo.config.base import check, doc


@dataclass
class OptimConfig:
    """AdamW with linear warm-up (the paper: lr 1e-6, 10 warm-up steps, then constant)."""

    lr: float = doc(1e-6, "peak learning rate")
    min_lr: float = doc(0.0, "floor for decaying schedules")
    schedule: Literal["constant", "cosine", "linear"] = doc("constant", "shape after warm-up")
    warmup_steps: int = doc(10, "linear warm-up length in optimizer steps")
    weight_decay: float = doc(0.1, "AdamW weight decay")
    beta1: float = doc(0.9, "AdamW beta1")
    beta2: float = doc(0.999, "AdamW beta2")
    adam_eps: float = doc(1e-8, "AdamW epsilon")
    grad_clip: float = doc(1.0, "global gradient-norm clip; 0 = off")

    def __post_init__(self):
        check(0 < self.lr < 1, "optim.lr", "must be in (0, 1)")
        check(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be in [0, optim.lr]")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(0 < self.adam_eps < 1, "optim.adam_eps", "must be in (0, 1)")
        check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")


@dataclass
class TrainConfig:
    """The outer loop."""

    steps: int = doc(500, "RL steps (one rollout batch each)")
    prompts_per_step: int = doc(128, "prompts sampled per step")
    mini_batch_prompts: int = doc(32, "prompts per PPO mini-batch (prompts_per_step / this = updates per step)")
    seed: int = doc(1234, "global seed (data order, sampling, dropout)")
    prompt_sampling: Literal["uniform", "prioritized"] = doc(
        "uniform", "uniform, or SPO-prioritised by tracked success probability")
    max_sampled_tokens: Optional[int] = doc(
        None, "also stop once the run has sampled this many tokens (every phase, discarded SKPO candidates and "
              "Monte Carlo continuations included); null = train.steps alone. Compares methods at equal cost")

    def __post_init__(self):
        check(self.steps >= 0, "train.steps", "must be >= 0")
        check(self.prompts_per_step > 0, "train.prompts_per_step", "must be > 0")
        check(self.mini_batch_prompts > 0, "train.mini_batch_prompts", "must be > 0")
        check(self.prompts_per_step % self.mini_batch_prompts == 0, "train.mini_batch_prompts",
              f"must divide train.prompts_per_step ({self.prompts_per_step})")
        check(self.max_sampled_tokens is None or self.max_sampled_tokens > 0, "train.max_sampled_tokens",
              "must be > 0 or null")


@dataclass
class ValidationConfig:
    """Validation inside the loop on ``data.eval`` with the colocated engine (avg@k, pass@k)."""

    interval: int = doc(0, "validate every N steps (0: only before the first and after the last step)")
    at_start: bool = doc(True, "validate the starting policy before the first step (logged as step 0)")
    k: int = doc(4, "samples per problem")
    temperature: float = doc(0.6, "sampling temperature of validation")
    max_tokens: Optional[int] = doc(None, "response cap; null = rollout.max_response_tokens")

    def __post_init__(self):
        check(self.interval >= 0, "validation.interval", "must be >= 0")
        check(self.k >= 1, "validation.k", "must be >= 1")
        check(self.temperature >= 0, "validation.temperature", "must be >= 0 (0 = greedy)")
        check(self.max_tokens is None or self.max_tokens > 0, "validation.max_tokens", "must be > 0 or null")


@dataclass
class CheckpointConfig:
    """Atomic checkpoints (temporary dir, rename, then the ``latest`` pointer)."""

    enabled: bool = doc(True, "write training checkpoints; false: a run that cannot resume (exports still work)")
    dir: Optional[str] = doc(None, "checkpoint directory; null = <logging.dir>/checkpoints")
    save_interval: int = doc(50, "save every N steps; 0 = only at the end")
    keep_last: int = doc(3, "keep the newest K checkpoints")
    resume: bool = doc(True, "resume from <dir>/latest when it exists")
    export_hf: Optional[str] = doc(None, "write the final HF checkpoint here (never the run's own directory or the "
                                         "input model; see export_overwrite)")
    export_overwrite: bool = doc(False, "replace a non-empty export_hf directory (its previous files are removed "
                                        "only after the new export is complete)")
    export_max_shard_size: str = doc("5GB", "largest safetensors file of the export (e.g. 500MB); a bigger model is "
                                            "written as model-0000k-of-0000n files plus model.safetensors.index.json")
    signal_grace_s: float = doc(25.0, "after SIGTERM/SIGINT, the seconds within which the trainer finishes the "
                                      "step and writes its checkpoint, else it stops without one (Slurm kills "
                                      "30 s after SIGTERM by default: its KillWait; with sbatch "
                                      "--signal=B:TERM@120 the signal comes 120 s before the time limit)")

    def __post_init__(self):
        check(self.save_interval >= 0, "checkpoint.save_interval", "must be >= 0")
        check(self.signal_grace_s >= 0, "checkpoint.signal_grace_s", "must be >= 0")
        check(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        check(self.dir is None or bool(self.dir.strip()), "checkpoint.dir", "must be a non-empty path or null")
        check(_size_bytes(self.export_max_shard_size) > 0, "checkpoint.export_max_shard_size",
              f"{self.export_max_shard_size!r} is not a positive size such as 5GB, 500MB or 1048576")


@dataclass
class LoggingConfig:
    """Metrics sinks."""

    dir: str = doc("runs/default", "run directory (resolved config, metrics.jsonl, TensorBoard)")
    jsonl: bool = doc(True, "write metrics.jsonl")
    tensorboard: bool = doc(True, "write TensorBoard events")
    wandb: bool = doc(False, "log to Weights & Biases if installed")
    wandb_project: str = doc("megatron-skpo", "W&B project")
    wandb_entity: Optional[str] = doc(None, "W&B entity (team or user); null = the default of the login")
    wandb_missing: Literal["warn", "error"] = doc(
        "warn", "logging.wandb is on but the wandb package does not import: warn and go on, or stop at start-up")
    progress: bool = doc(True, "show a progress bar with ETA")
    phase_grad_norm_interval: int = doc(
        0, "every N steps, measure each phase's gradient norm (SKPO: upstream vs downstream) with one extra "
           "forward/backward per phase on the step's first mini-batch; 0 = off")
    lines: bool = doc(False, "print one line per step (step, reward, accuracy, validation, sampled tokens, seconds): "
                             "for logs and terminals where a progress bar is noise")
    progress_metrics: list[str] = doc(
        factory=lambda: ["reward", "accuracy"], help="metrics shown next to the progress bar")

    def __post_init__(self):
        check(bool(self.dir.strip()), "logging.dir", "must be a non-empty path")
        check(self.phase_grad_norm_interval >= 0, "logging.phase_grad_norm_interval", "must be >= 0")
        check(bool(self.wandb_project.strip()), "logging.wandb_project", "must be non-empty")
        check(all(isinstance(m, str) and m for m in self.progress_metrics), "logging.progress_metrics",
              "must be a list of metric names")


def _size_bytes(text: str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"1024"`` in bytes (decimal units, as transformers uses); 0 if unreadable."""
    try:
        return parse_size(str(text))
    except ValueError:
        return 0
