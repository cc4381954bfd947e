"""One grading worker process of :class:`~megatron_skpo.rewards.pool.RewardPool`.

Started as ``python -m megatron_skpo.rewards.grade_worker FD MEMORY_MB PARENT_PID``: a fresh
interpreter whose ``__main__`` is this module. (multiprocessing's ``spawn`` re-imports the
caller's ``__main__`` in every child instead, so a plain script calling ``math_reward`` without an
``if __name__ == "__main__":`` guard re-ran itself in the worker, which then failed to start.)

``FD`` is the worker's end of a socket pair inherited from the parent. The first message is the
:class:`~megatron_skpo.rewards.kinds.RewardPlan` to run (it imports custom rewards); the worker
answers ``"ready"`` (or ``("failed", text)`` when the plan cannot be built), then one
:class:`~megatron_skpo.rewards.grader.Grade` per request ``(response, reference)``, all with
:mod:`multiprocessing.connection`'s framing. The worker grades in its main thread until the
parent closes the socket.

On Linux the worker asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), so a
worker stuck in sympy's C code (where no Python-level watchdog gets the GIL) does not outlive a
killed trainer. The signal fires when the *thread* that started the worker ends, which is why the
pool starts workers from one long-lived thread (:func:`megatron_skpo.rewards.pool.start_worker`).
"""
from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import sys
from multiprocessing.connection import Connection
from typing import Optional, Sequence

from megatron_skpo.rewards.reference import Reference


def serve(conn: Connection, memory_mb: int) -> None:
    """Receive the plan, then ``(response, reference)``, send back a Grade; returns when the
    connection closes."""
    # We turn math-verify's signal timeouts off on purpose (the parent kills slow workers).
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if memory_mb > 0:  # a runaway sympy expansion fails with MemoryError instead of swapping
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        plan = conn.recv()
        grade = plan.grader()
        if any(t.kind == "math" for t in plan.terms):
            grade("\\boxed{1}", Reference("1"))  # warm the math imports before reporting ready
    except (EOFError, OSError):
        return
    except Exception as e:  # a custom reward that does not import: the parent raises with this text
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send("ready")
    while True:
        try:
            response, ref = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(grade(response, ref))


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print("usage: python -m megatron_skpo.rewards.grade_worker FD MEMORY_MB PARENT_PID", file=sys.stderr)
        return 2
    fd, memory_mb, parent = int(args[0]), int(args[1]), int(args[2])
    from megatron_skpo.helper_signals import leave_stopping_to_the_trainer

    die_with_parent(parent)
    leave_stopping_to_the_trainer()  # the launcher's SIGTERM reaches us too; the trainer decides
    serve(Connection(fd), memory_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
