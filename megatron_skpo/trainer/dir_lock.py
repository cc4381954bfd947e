"""One run at a time per run directory: ``logging.dir`` (and ``checkpoint.dir`` when it lies
outside it) is locked by the run's rank 0 before anything is written.

The rule:

- ``flock(LOCK_EX | LOCK_NB)`` on ``<dir>/.skpo-train.lock``, held until the process exits. The
  kernel releases it when the holder dies (even ``kill -9``, a node crash on a local disk), so a
  crash never leaves a stale lock. The file records host, pid and start time, so the second run's
  error names who holds it. The file itself stays behind; it means nothing without the flock.
- Some cluster file systems refuse ``flock`` (``ENOLCK``, ``EOPNOTSUPP``: NFS without a lock
  daemon, Lustre mounted without ``flock``). Then the lock is ``<dir>/.skpo-train.lock.held``,
  created with ``O_EXCL`` and removed when the run ends. A file left by a process of this host that
  is gone (or a pid reused by a later process) is stale and taken over with a warning; one left by
  another host is never taken over: the error says to remove it by hand once no run uses the
  directory.
- Ranks other than 0 take no lock and write nothing until the process group is up, which rank 0
  joins only once it holds the lock: a second job's ranks block in the rendezvous and are stopped
  by the launcher when its rank 0 exits.

Lustre mounted with ``localflock`` gives node-local flocks only: two jobs on different nodes would
both get the lock. Mount with ``flock`` (the default on recent Lustre) for cluster-wide locks.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

LOCK_NAME = ".skpo-train.lock"
HELD_NAME = LOCK_NAME + ".held"  # the O_EXCL fallback where flock is unsupported
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class DirBusy(RuntimeError):
    """Another live run holds the directory; the message names it."""


def _holder_info() -> dict:
    from checkpoint_convert.staging import _start_time

    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_time(os.getpid()) or 0,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _read_holder(path: Path) -> dict:
    for _ in range(20):  # the holder writes its record right after taking the lock
        try:
            text = path.read_text()
        except OSError:
            return {}
        if text.strip():
            try:
                return json.loads(text)
            except ValueError:
                return {}
        time.sleep(0.05)
    return {}


def _busy(field: str, directory: Path, path: Path, holder: dict, hint: str = "") -> str:
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')}"
    return (f"{field} {directory} is in use by {who} (lock file {path}); wait for it, or use another "
            f"{field}{hint}")


class DirLock:
    """The lock of one directory (``field`` names its config key in messages)."""

    def __init__(self, directory: str | Path, field: str = "logging.dir"):
        self.directory, self.field = Path(directory), field
        self._fd: Optional[int] = None
        self._held: Optional[Path] = None

    def acquire(self) -> "DirLock":
        """Take the lock (creating the directory) or raise :class:`DirBusy`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DirBusy(_busy(self.field, self.directory, path, _read_holder(path))) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_FLOCK:
                raise
            log.warning("%s: flock unsupported here (%s); using %s instead", self.directory, e, HELD_NAME)
            return self._acquire_exclusive()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_info()) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _acquire_exclusive(self, retry: bool = True) -> "DirLock":
        path = self.directory / HELD_NAME
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _read_holder(path)
            if retry and stale(holder):
                log.warning("%s: taking over the lock left by pid %s on this host, which is gone",
                            self.directory, holder.get("pid"))
                path.unlink(missing_ok=True)
                return self._acquire_exclusive(retry=False)
            hint = ("" if holder.get("host") == socket.gethostname() else
                    f"; if no run on host {holder.get('host', '?')} uses it any more, remove {path}")
            raise DirBusy(_busy(self.field, self.directory, path, holder, hint)) from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(_holder_info()) + "\n")
        self._held = path
        return self

    def release(self) -> None:
        if self._held is not None:
            self._held.unlink(missing_ok=True)
            self._held = None
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def stale(holder: dict) -> bool:
    """A fallback lock record whose process provably died: same host, pid gone or reused."""
    from checkpoint_convert.staging import _owner_dead

    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    return _owner_dead(holder["pid"], int(holder.get("pid_start") or 0))


def lock_problem(directory: str | Path, field: str = "logging.dir") -> Optional[str]:
    """What :meth:`DirLock.acquire` would refuse with, without keeping the lock (``--dry-run``)."""
    directory = Path(directory)
    if not (directory / LOCK_NAME).exists() and not (directory / HELD_NAME).exists():
        return None
    lock = DirLock(directory, field)
    try:
        lock.acquire()
    except DirBusy as e:
        return str(e)
    except OSError:
        return None  # unreadable or read-only: other checks (and the run itself) say so
    lock.release()
    return None


_HELD: list[DirLock] = []  # kept for the life of the process


def lock_run_dirs(run_dir: str | Path, ckpt_dir: str | Path) -> list[DirLock]:
    """Rank 0: lock ``logging.dir`` and a ``checkpoint.dir`` outside it, for the rest of the process."""
    run, ckpt = Path(run_dir), Path(ckpt_dir)
    wanted = [(run, "logging.dir")]
    if run.resolve() not in [ckpt.resolve(), *ckpt.resolve().parents]:
        wanted.append((ckpt, "checkpoint.dir"))
    taken = []
    try:
        for d, field in wanted:
            taken.append(DirLock(d, field).acquire())
    except DirBusy:
        for lock in taken:
            lock.release()
        raise
    _HELD.extend(taken)
    return taken
