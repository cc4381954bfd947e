"""Run a function on N gloo ranks spawned from pytest (unique port, one thread per rank)."""
from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _detached(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _entry(fn: Callable, rank: int, world: int, port: int, queue, args: tuple) -> None:
    os.environ.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        # pickle here (not in the queue's feeder thread) so that failures reach the parent
        queue.put((rank, pickle.dumps(_detached(fn(rank, world, *args))), None))
    except BaseException:  # report, so the parent fails with the rank's traceback
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, world: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``[fn(rank, world, *args) for each rank]``, each in its own process over gloo."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, queue, args)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failed = True
    try:
        for _ in range(world):
            rank, value, error = queue.get(timeout=timeout)
            if error is not None:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            results[rank] = pickle.loads(value)
        failed = False
    finally:
        for p in procs:  # a failed rank leaves its peers blocked in a collective: end them
            p.join(timeout=0 if failed else 30)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]
