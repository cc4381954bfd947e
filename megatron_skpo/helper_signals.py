"""The stop signals, and how the trainer's helper processes treat them (a leaf module: reward
workers import it without importing the trainer)."""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)  # what stops a run: Slurm, torchrun, scancel, Ctrl-C


def leave_stopping_to_the_trainer() -> None:
    """In a helper process the trainer started (reward workers, a spawned rollout worker): ignore
    SIGTERM and SIGINT. torchrun signals the trainer's whole process group and Slurm every process of
    the job step, so the helpers get the signal too; the trainer decides when to stop, needs them
    until its checkpoint is written, and they die with it (``PR_SET_PDEATHSIG``, the lifeline). An
    ignored signal stays ignored across exec: what a helper starts (the code sandbox) ignores it too
    and is ended by its own timeouts."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
