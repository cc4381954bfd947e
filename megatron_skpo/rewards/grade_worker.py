"""One grading worker process of :class:`~megatron_skpo.rewards.pool.RewardPool`.

Started as ``python -m megatron_skpo.rewards.grade_worker FD MEMORY_MB PARENT_PID EXTRACTOR...``:
a fresh interpreter whose ``__main__`` is this module. (multiprocessing's ``spawn`` re-imports the
caller's ``__main__`` in every child instead, so a plain script calling ``math_reward`` without an
``if __name__ == "__main__":`` guard re-ran itself in the worker, which then failed to start.)

``FD`` is the worker's end of a socket pair inherited from the parent; requests ``(response,
gold)`` and replies (``"ready"``, then one :class:`~megatron_skpo.rewards.grader.Grade` per
request) travel over it with :mod:`multiprocessing.connection`'s framing. The worker grades in
its main thread until the parent closes the socket.

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

from megatron_skpo.rewards.grader import grade_math


def serve(conn: Connection, extractors: tuple[str, ...], memory_mb: int) -> None:
    """Receive ``(response, gold)``, send back a Grade; returns when the connection closes."""
    # We turn math-verify's signal timeouts off on purpose (the parent kills slow workers).
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if memory_mb > 0:  # a runaway sympy expansion fails with MemoryError instead of swapping
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    grade_math("\\boxed{1}", "1", extractors)  # warm the imports before reporting ready
    conn.send("ready")
    while True:
        try:
            response, gold = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(grade_math(response, gold, extractors))


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4:
        print("usage: python -m megatron_skpo.rewards.grade_worker FD MEMORY_MB PARENT_PID EXTRACTOR...",
              file=sys.stderr)
        return 2
    fd, memory_mb, parent, extractors = int(args[0]), int(args[1]), int(args[2]), tuple(args[3:])
    die_with_parent(parent)
    serve(Connection(fd), extractors, memory_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
