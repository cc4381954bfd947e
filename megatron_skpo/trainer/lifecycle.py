"""Stopping on SIGTERM/SIGINT at a safe point, and no child process outliving the trainer.

Slurm sends SIGTERM on pre-emption, at the time limit and on ``scancel``, then SIGKILL after its
``KillWait`` (30 s by default); torchrun forwards SIGTERM to every rank; Ctrl-C is SIGINT. The first
such signal only sets a flag (:class:`Stop`); the loop looks at it between stages and at the end of
each step, and every rank takes the same decision (a MAX all-reduce of the flags at those points, so
a rank that got the signal later, or not at all, stops at the same step):

- between stages, the step is abandoned when finishing it and saving would overrun
  ``checkpoint.signal_grace_s`` from the signal (the previous step's and save's times are the
  estimates) or when checkpoints are off: nothing of it is saved, the last checkpoint stands;
- at the end of a step, its checkpoint is written (unless it just was) when the last save's time
  still fits the grace, the asynchronous loop filing its finished rollouts as every save does.

Then :class:`Stopped` carries the one-line message and the exit code 128 + signal (143 for
SIGTERM, 130 for SIGINT). The first signal restores the default action, so a second one ends the
process at once; its children then die by the lifeline (``trainer/lifeline.py``), as after
``kill -9``. The trainer's helper processes ignore both signals (``helper_signals.leave_stopping_to_the_trainer``):
launchers signal every process, and the helpers must outlive the trainer's last checkpoint.
A checkpoint is never half-written either way (``trainer/checkpoint.py``: temporary
directory, rename, then the ``latest`` pointer).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from megatron_skpo.helper_signals import SIGNALS

_lifeline: Optional[subprocess.Popen] = None


class Stopped(Exception):
    """The run stopped on a signal; ``str`` is the line to print, ``code`` the exit status."""

    def __init__(self, line: str, code: int):
        super().__init__(line)
        self.code = code


def _agree(flags: list[float]) -> list[float]:
    """Element-wise MAX of ``flags`` over the job's ranks (unchanged with one rank)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flags
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(flags, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


class Stop:
    """The stop request of one run: installs the SIGTERM/SIGINT handlers (main thread only) until
    :meth:`close`; :meth:`clock` starts a step, :meth:`check` is called between its stages,
    :meth:`end_of_step` after it."""

    def __init__(self, grace_s: float, can_save: bool, rank: int = 0):
        self.grace_s, self.can_save, self.rank = grace_s, can_save, rank
        self.signum: Optional[int] = None
        self.at: Optional[float] = None  # monotonic time of the signal
        self.step_s: Optional[float] = None  # the last whole step's and save's wall times (estimates)
        self.save_s: Optional[float] = None
        self._step_t0 = time.monotonic()
        self._old: dict = {}
        self.step = 0  # the last finished step
        self.last_saved: Callable[[], Optional[int]] = lambda: None  # the newest checkpoint's step (the loop's)
        if hasattr(signal, "pthread_kill") and _main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signum, self.at = signum, time.monotonic()
        for s in SIGNALS:  # a second signal ends the process at once (the lifeline reaps its children)
            signal.signal(s, signal.SIG_DFL)
        if self.rank == 0:
            print(f"skpo-train: {signal.Signals(signum).name} after step {self.step}: stopping at the next safe "
                  f"point (checkpoint within checkpoint.signal_grace_s={self.grace_s:g} s); a second signal "
                  f"exits at once", file=sys.stderr, flush=True)

    def close(self) -> None:
        for s, old in self._old.items():
            if signal.getsignal(s) == self._handle or self.signum is None:
                signal.signal(s, old)
        self._old = {}

    def clock(self):
        """A step's :class:`~megatron_skpo.trainer.stages.Clock` whose stage boundaries call :meth:`check`."""
        from megatron_skpo.trainer.stages import Clock

        self._step_t0 = time.monotonic()
        return Clock(on_stage=self.check)

    def _late(self, rest_s: float) -> float:
        """1.0 when ``rest_s`` more seconds after now overrun the grace since the signal, else 0.0."""
        if self.at is None:
            return 0.0
        return float(time.monotonic() - self.at + rest_s > self.grace_s)

    def check(self) -> None:
        """Between stages: abandon the step when every rank agrees a signal came and finishing it plus a
        save would overrun the grace on some rank (or there is nothing to save)."""
        rest = max(0.0, (self.step_s or 0.0) - (time.monotonic() - self._step_t0)) + (self.save_s or 0.0)
        signum, late = _agree([float(self.signum or 0), self._late(rest)])
        if signum:
            self.signum = self.signum or int(signum)
            if late or not self.can_save:
                raise self.stopped(None)  # the step is dropped: nothing of it is saved

    def timed(self, save: Callable[[], Path]) -> Path:
        t0 = time.monotonic()
        out = save()
        self.save_s = time.monotonic() - t0
        return out

    def end_of_step(self, step: int, saved: bool, save: Callable[[], Path]) -> None:
        """After step ``step`` (``saved``: its checkpoint was just written): raise :class:`Stopped` when a
        signal came, after writing the checkpoint if it fits the grace."""
        self.step, self.step_s = step, time.monotonic() - self._step_t0
        signum, late = _agree([float(self.signum or 0), self._late(self.save_s or 0.0)])
        if not signum:
            return
        self.signum = self.signum or int(signum)
        if self.can_save and not saved and not late:
            self.timed(save)
            saved = True
        raise self.stopped(step if saved else None)

    def stopped(self, written: Optional[int]) -> Stopped:
        name = signal.Signals(self.signum).name
        if written is not None:
            from megatron_skpo.trainer.checkpoint import checkpoint_name

            what = f"checkpoint {checkpoint_name(written)} written; resume with the same command"
        else:
            previous = self.last_saved()
            what = f"no checkpoint (the last is step {previous})" if previous is not None else \
                "no checkpoint (none was written: a restart starts afresh)"
        return Stopped(f"skpo-train: {name} at step {self.step}: {what}", 128 + self.signum)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def start_lifeline() -> Optional[subprocess.Popen]:
    """Start this process's lifeline (once; Linux only): it kills our descendants when we die."""
    global _lifeline
    if _lifeline is not None or not Path("/proc/self/stat").exists():
        return _lifeline
    script = Path(__file__).with_name("lifeline.py")
    _lifeline = subprocess.Popen([sys.executable, "-I", str(script), str(os.getpid())], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, close_fds=True)
    return _lifeline

