"""The trainer's lifeline: a small watchdog process that kills what the trainer leaves behind.

Run as ``python -I lifeline.py TRAINER_PID`` (by path: it imports nothing of the package), started by
:func:`megatron_skpo.trainer.lifecycle.start_lifeline`. It asks the kernel for SIGKILL when the trainer
dies (``PR_SET_PDEATHSIG``), but first, while the trainer lives, it records the trainer's descendants
every second (pid and start time, from ``/proc``). When the trainer is gone -- an ordinary exit, or
``kill -9`` that gave it no chance to clean up -- it SIGKILLs every recorded process that still runs
with the same start time, and their descendants. That covers the processes libraries start without
a parent-death signal of their own: megatron's checkpoint writer starts a ``multiprocessing``
manager (a ``spawn`` process, about 280 MB) and a resource tracker on the first save; vLLM's engine
core processes; and, as a second net, the reward graders and rollout workers (which set their own).

A child younger than the last scan is not recorded. The ones that matter are megatron's write
workers: each save ``fork``s one per write bucket, copies of the trainer (gigabytes), which block
forever once the trainer is gone. So after the trainer's death the lifeline also kills its *forks*
(:func:`orphaned_forks`): processes with the trainer's command line and process group, started
during its life, whose parent is no longer the trainer's parent (they were re-parented when it
died; other ranks of the same launcher keep theirs).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

SCAN_S = 1.0  # how often the descendants are recorded (a child younger than this may be missed)
POLL_S = 0.2  # how often the trainer's death is looked for
EXIT_GRACE_S = 2.0  # how long the trainer's children get to end by themselves once it is gone


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every process below ``root`` (children, their children, ...)."""
    parent: dict[int, int] = {}
    start: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            parent[int(name)], start[int(name)] = st
    found, todo = {}, [root]
    while todo:
        p = todo.pop()
        for child, pp in parent.items():
            if pp == p and child not in found:
                found[child] = start[child]
                todo.append(child)
    return found


def _cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def _pgrp(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def orphaned_forks(cmdline: bytes, pgrp: int, launcher: int, started: int, spare: int) -> dict[int, int]:
    """{pid: start time} of the dead trainer's forks: its command line and process group, started
    since ``started`` (the trainer's start), with a parent other than ``launcher`` (the trainer's)."""
    out = {}
    for name in os.listdir("/proc"):
        pid = int(name) if name.isdigit() else -1
        st = _stat(pid) if pid > 0 and pid != spare else None
        if st is not None and st[0] != launcher and st[1] >= started and _pgrp(pid) == pgrp \
                and _cmdline(pid) == cmdline:
            out[pid] = st[1]
    return out


def kill_recorded(known: dict[int, int], spare: int) -> int:
    """SIGKILL every still-running recorded process (same start time) and its descendants; the count."""
    victims = {}
    for pid, started in known.items():
        st = _stat(pid)
        if pid != spare and st is not None and st[1] == started:
            victims[pid] = started
            victims.update(descendants(pid))
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(victims)


def watch(trainer: int) -> int:
    me = os.getpid()
    known: dict[int, int] = {}
    last_scan = 0.0
    launcher, started = _stat(trainer) or (0, 0)
    cmdline, pgrp = _cmdline(trainer), _pgrp(trainer)
    while os.getppid() == trainer and _stat(trainer) is not None:
        if time.monotonic() - last_scan >= SCAN_S:
            known.update(descendants(trainer))
            known.pop(me, None)
            last_scan = time.monotonic()
        time.sleep(POLL_S)
    deadline = time.monotonic() + EXIT_GRACE_S  # after an ordinary exit the rest are ending on their own
    while time.monotonic() < deadline and any(_stat(p) is not None and _stat(p)[1] == s for p, s in known.items()):
        time.sleep(POLL_S)
    if cmdline and pgrp is not None:
        known.update(orphaned_forks(cmdline, pgrp, launcher, started, spare=me))
    n = kill_recorded(known, spare=me)
    if n:
        print(f"skpo-train lifeline: the trainer (pid {trainer}) is gone; killed {n} process(es) it left",
              file=sys.stderr, flush=True)
    return 0


def main(argv: list[str]) -> int:
    trainer = int(argv[1])
    # the kernel's SIGTERM when the trainer dies only wakes us up; the kill happens in watch()
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the trainer handles it
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    return watch(trainer)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
