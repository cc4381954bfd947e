"""The trainer <-> rollout-worker bridge of ``rollout.placement: disaggregated``: a control channel per
worker and one weight-broadcast group.

- Control: ``multiprocessing.connection`` over TCP between the trainer's rank 0 and each worker,
  authenticated by HMAC with a per-run random key (a peer without the key is refused before any
  message is read; pickled messages are only ever read from such a peer). Messages are
  ``(kind, payload)`` tuples: requests one way, rollouts back.
  :class:`Channel` turns a dead peer into :class:`WorkerLost` (never a hang): every wait polls in
  short slices and asks the caller's liveness check (the worker's process, or the connection).
- Weights: a ``torch.distributed`` process group of its own (gloo on CPU, NCCL on GPU) made over a
  ``TCPStore`` that the trainer's rank 0 hosts: rank 0 is the trainer, rank i + 1 is worker i. It is
  independent of the trainer's world, so Megatron's parallel state stays the trainer's alone.
  :func:`send_buckets` broadcasts the HF-named tensors bucket by bucket (a header, the bucket's
  JSON metadata, one flat byte buffer); :func:`recv_buckets` rebuilds them. Each collective waits at
  most ``rollout.transport_timeout_s``; a stall is a :class:`BridgeError` naming the bucket, its first
  tensor and the workers that did not answer.
"""
from __future__ import annotations

import datetime
import json
import pickle
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

Named = list[tuple[str, torch.Tensor]]
_ALIGN = 16  # bytes


def send_msg(conn, kind: str, payload: dict) -> None:
    """One message. Plain pickle, not ``Connection.send``: torch registers shared-memory reductions with
    multiprocessing's pickler, which would send tensors as file descriptors (useless across hosts)."""
    conn.send_bytes(pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL))


def recv_msg(conn) -> tuple[str, dict]:
    return pickle.loads(conn.recv_bytes())


class BridgeError(RuntimeError):
    """The bridge failed: a stalled broadcast, a refused connection, a protocol error."""


class WorkerLost(BridgeError):
    """A rollout worker died or closed its connection."""


@dataclass
class Channel:
    """One worker's control connection. ``alive()`` returns None while the peer lives, else why not."""

    conn: Any  # multiprocessing.connection.Connection
    name: str  # "rollout worker 0 (pid 1234)"
    alive: Callable[[], Optional[str]] = lambda: None

    def send(self, kind: str, **payload) -> None:
        try:
            send_msg(self.conn, kind, payload)
        except (OSError, EOFError) as e:
            raise WorkerLost(f"{self.name}: connection lost while sending {kind!r} ({e}); {self._why()}") from e

    def recv(self, timeout_s: float, waiting_for: str) -> tuple[str, dict]:
        """The next message; WorkerLost when the peer dies, BridgeError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.conn.poll(min(1.0, max(deadline - time.monotonic(), 0.0))):
                    kind, payload = recv_msg(self.conn)
                    if kind == "error":
                        raise BridgeError(f"{self.name} failed while {waiting_for}:\n{payload.get('traceback', '')}")
                    return kind, payload
            except (OSError, EOFError) as e:
                raise WorkerLost(f"{self.name}: connection lost while {waiting_for}; {self._why()}") from e
            why = self.alive()
            if why is not None:
                raise WorkerLost(f"{self.name}: {why} while {waiting_for}")
            if time.monotonic() > deadline:
                raise BridgeError(f"{self.name}: no answer within {timeout_s:.0f} s while {waiting_for} "
                                  "(rollout.timeout_s)")

    def _why(self) -> str:
        """Why the connection closed: the process's end if it comes within 5 s (the socket closes first)."""
        deadline = time.monotonic() + 5.0
        while (why := self.alive()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return why or "the process is still alive"


def weight_group(host: str, port: int, rank: int, size: int, timeout_s: float, backend: str = "gloo"):
    """The weight-broadcast group (rank 0 = the trainer, which hosts the store). Returns the process group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, size, rank == 0, timeout=timeout, wait_for_workers=False)
    prefixed = dist.PrefixStore("skpo-weights", store)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, opts)
    return dist.ProcessGroupGloo(prefixed, rank, size, timeout)


def _broadcast(pg, tensor: torch.Tensor, what: str, timeout_s: float, stalled: Callable[[], str]) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    try:
        pg.broadcast([tensor], opts).wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise BridgeError(f"weight broadcast stalled at {what}: {stalled()} (rollout.transport_timeout_s="
                          f"{timeout_s:.0f}; {first})") from e


def _header(meta_bytes: int, data_bytes: int, more: int, device) -> torch.Tensor:
    return torch.tensor([meta_bytes, data_bytes, more], dtype=torch.int64, device=device)


def send_buckets(pg, buckets: Iterable[Named], timeout_s: float, stalled: Callable[[], str],
                 device: str = "cpu") -> tuple[int, int]:
    """Broadcast every bucket from rank 0; returns (bytes, buckets). Collective with :func:`recv_buckets`."""
    total = count = 0
    for i, bucket in enumerate(buckets):
        flat, meta, offset = [], [], 0
        for name, t in bucket:
            b = t.detach().contiguous().reshape(-1).view(torch.uint8)
            meta.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, b.numel()])
            pad = -b.numel() % _ALIGN  # every tensor starts aligned, so the receiver can view it in place
            flat += [b, torch.zeros(pad, dtype=torch.uint8, device=b.device)]
            offset += b.numel() + pad
        meta_t = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8).to(device)
        data = torch.cat(flat).to(device) if flat else torch.empty(0, dtype=torch.uint8, device=device)
        what = f"bucket {i} ({len(bucket)} tensors from {bucket[0][0] if bucket else '-'}, {offset:,} bytes)"
        _broadcast(pg, _header(meta_t.numel(), data.numel(), 1, device), what + " header", timeout_s, stalled)
        _broadcast(pg, meta_t, what + " metadata", timeout_s, stalled)
        _broadcast(pg, data, what, timeout_s, stalled)
        total, count = total + sum(m[4] for m in meta), count + 1
    _broadcast(pg, _header(0, 0, 0, device), "the end marker", timeout_s, stalled)
    return total, count


def recv_buckets(pg, timeout_s: float, device: str = "cpu") -> Iterator[Named]:
    """Yield the buckets rank 0 broadcasts (tensors are views of one received buffer per bucket)."""
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
              "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
              "bool": torch.bool, "float8_e4m3fn": torch.float8_e4m3fn}
    stalled = lambda: "the trainer (rank 0) did not send"  # noqa: E731
    while True:
        header = _header(0, 0, 0, device)
        _broadcast(pg, header, "a bucket header", timeout_s, stalled)
        meta_n, data_n, more = (int(x) for x in header.tolist())
        if not more:
            return
        meta_t = torch.empty(meta_n, dtype=torch.uint8, device=device)
        _broadcast(pg, meta_t, "bucket metadata", timeout_s, stalled)
        data = torch.empty(data_n, dtype=torch.uint8, device=device)
        _broadcast(pg, data, "bucket data", timeout_s, stalled)
        out = []
        for name, dtype, shape, offset, nbytes in json.loads(meta_t.cpu().numpy().tobytes().decode()):
            if dtype not in dtypes:
                raise BridgeError(f"weight broadcast: tensor {name} has unsupported dtype {dtype}")
            out.append((name, data[offset:offset + nbytes].view(dtypes[dtype]).view(shape)))
        yield out
