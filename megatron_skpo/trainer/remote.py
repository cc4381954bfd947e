"""The trainer's side of ``rollout.placement: disaggregated``: its rank 0 starts (or waits for) the
rollout workers (``trainer.worker``), sends them requests, collects their rollouts and broadcasts
each new policy version to them (``rollout.bridge``).

Spawned workers (``rollout.worker_launch: spawn``) run on the trainer's node, each pinned to its
``rollout.worker_cpus`` / ``rollout.worker_devices`` share, and die with the trainer. External ones
(``external``) are started by the launcher on the rollout nodes with ``skpo-rollout --connect
HOST:PORT --key-file <logging.dir>/rollout_bridge.key`` (``scripts/run_7b.sh --rollout-nodes``); the
trainer writes that key (mode 0600) and waits ``rollout.timeout_s`` for them.

Replies come back per worker in request order. Waiting for one kind of reply (a weight
acknowledgement) keeps the others that arrive first (rollouts of earlier requests) for later.
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_skpo.config import Config, to_dict
from megatron_skpo.rollout.bridge import BridgeError, Channel, send_buckets, weight_group
from megatron_skpo.rollout.weight_sync import SyncStats, bucketize
from megatron_skpo.trainer.build import free_port

KEY_FILE = "rollout_bridge.key"


def _split(spec: str, n: int, i: int) -> str:
    """Worker ``i``'s part of a '|'-separated per-worker list ('' everywhere when unset)."""
    parts = spec.split("|") if spec else []
    return parts[i % len(parts)] if parts else ""


class RolloutWorkers:
    """The rollout workers of a run, seen from the trainer's rank 0."""

    def __init__(self, cfg: Config, backend: str = "gloo"):
        from multiprocessing.connection import Listener

        r = cfg.rollout
        self.cfg, self.timeout_s, self.procs = cfg, r.timeout_s, []
        self.load_seconds = 0.0  # the slowest worker's last weight load (vLLM), reported by the workers
        spawn = r.worker_launch == "spawn"
        host = r.bridge_host or ("127.0.0.1" if spawn else socket.gethostname())
        bind = "127.0.0.1" if spawn and not r.bridge_host else "0.0.0.0"
        port = r.bridge_port or free_port()
        weights_port = r.bridge_port + 1 if r.bridge_port else free_port()
        key = secrets.token_bytes(32)
        Path(cfg.logging.dir).mkdir(parents=True, exist_ok=True)  # the workers' logs and the key live there
        self.listener, self.channels = Listener((bind, port), authkey=key), []
        self.stash: list[list[tuple[str, dict]]] = [[] for _ in range(r.workers)]  # replies kept for later
        try:
            self._start(spawn, host, port, weights_port, key, backend)
        except BaseException:
            self.close()
            raise

    def _start(self, spawn: bool, host: str, port: int, weights_port: int, key: bytes, backend: str) -> None:
        r = self.cfg.rollout
        if not spawn:
            key_path = Path(self.cfg.logging.dir) / KEY_FILE
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key.hex())
            print(f"skpo-train: waiting for {r.workers} rollout worker(s): skpo-rollout --connect {host}:{port} "
                  f"--key-file {key_path}", flush=True)
        for i in range(r.workers):  # one at a time: channel i is process i
            if spawn:
                self.procs.append(self._spawn(f"{host}:{port}", key, i))
            self.channels.append(self._accept(i))
        cfg = self.cfg
        for i, ch in enumerate(self.channels):
            ch.send("hello", config=to_dict(cfg), index=i, workers=r.workers, weights_port=weights_port,
                    backend=backend)
        try:
            self.pg = weight_group(host, weights_port, 0, r.workers + 1, r.transport_timeout_s, backend)
        except RuntimeError as e:
            raise BridgeError(f"the weight-broadcast group did not form within {r.transport_timeout_s:.0f} s "
                              f"(rollout.transport_timeout_s): {self._stalled()} ({e})") from e
        for i, ch in enumerate(self.channels):
            ready = self._expect(i, "ready", "starting its engine")
            ch.name = f"rollout worker {i} (pid {ready['pid']} on {ready['host']})"

    def _spawn(self, address: str, key: bytes, i: int) -> subprocess.Popen:
        r = self.cfg.rollout
        env = {**os.environ, "SKPO_BRIDGE_KEY": key.hex()}
        for var in [v for v in env if v.startswith(("TORCHELASTIC_", "GROUP_", "ROLE_"))] + [
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]:
            env.pop(var, None)  # the worker is not a rank of the trainer's job
        if cpus := _split(r.worker_cpus, r.workers, i):
            env["SKPO_WORKER_CPUS"] = cpus
        if devices := _split(r.worker_devices, r.workers, i):
            env["CUDA_VISIBLE_DEVICES"] = devices
        log = open(Path(self.cfg.logging.dir) / f"rollout_worker_{i}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "megatron_skpo.trainer.worker", "--connect", address,
                                 "--spawned"], env=env, stdout=log, stderr=subprocess.STDOUT)

    def _alive(self, i: int):
        def check() -> Optional[str]:
            if i < len(self.procs) and (code := self.procs[i].poll()) is not None:
                log = Path(self.cfg.logging.dir) / f"rollout_worker_{i}.log"
                return f"the process exited with code {code} (its output: {log})"
            return None
        return check

    def _accept(self, i: int) -> Channel:
        """The next worker's connection; an error if a spawned worker dies first or none comes in time."""
        sock = self.listener._listener._socket  # noqa: SLF001 -- a timeout on accept(), else it blocks forever
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            sock.settimeout(1.0)
            try:
                conn = self.listener.accept()
                return Channel(conn, f"rollout worker {i}", self._alive(i))
            except socket.timeout:
                if (why := self._alive(i)()) is not None:
                    raise BridgeError(f"rollout worker {i}: {why} before it connected")
        raise BridgeError(f"no rollout worker {i} connected within {self.timeout_s:.0f} s (rollout.timeout_s)")

    def _expect(self, i: int, kind: str, waiting_for: str, match=lambda msg: True) -> dict:
        """Worker ``i``'s first reply of ``kind`` that ``match``es (waits); other replies that come
        first are kept for later."""
        for k, (got, msg) in enumerate(self.stash[i]):
            if got == kind and match(msg):
                return self.stash[i].pop(k)[1]
        while True:
            got, msg = self.channels[i].recv(self.timeout_s, waiting_for)
            if got == kind and match(msg):
                return msg
            self._keep(i, got, msg)

    def _keep(self, i: int, got: str, msg: dict) -> None:
        if got == "weights_done":  # a load nobody waits for: keep its time for the metrics
            self.load_seconds = msg["seconds"]
        else:
            self.stash[i].append((got, msg))

    def generate(self, i: int, **request) -> None:
        self.channels[i].send("generate", **request)

    def generated(self, i: int, step: int, version: int) -> dict:
        """Worker ``i``'s rollouts of ``step`` made with ``version`` (waits). Rollouts of the same step
        made with another version (requested again after a staleness drop) are discarded."""
        self.stash[i] = [(k, m) for k, m in self.stash[i]
                         if not (k == "generated" and m["step"] == step and m["version"] != version)]
        return self._expect(i, "generated", f"generating step {step}",
                            lambda m: m["step"] == step and m["version"] == version)

    def finished(self, i: int) -> list[dict]:
        """Worker ``i``'s rollouts received so far and not yet taken (no waiting)."""
        while self.channels[i].conn.poll(0):
            self._keep(i, *self.channels[i].recv(self.timeout_s, "sending rollouts"))  # a whole message
        return [m for k, m in self.stash[i] if k == "generated"]

    def push(self, named, version: int, bucket_bytes: int) -> SyncStats:
        """Broadcast a new policy version to every worker. Each first finishes what it was generating
        (so every request sent before the push is generated with the previous version); the trainer
        does not wait for the workers to load it: requests sent after the push are served after the
        load, and a failed load comes back as the worker's error on the next wait."""
        t0 = time.perf_counter()
        for ch in self.channels:
            ch.send("weights", version=version)
        for i in range(len(self.channels)):
            self._expect(i, "weights_ready", f"finishing its requests before weights version {version}")
        total, buckets = send_buckets(self.pg, bucketize(named, bucket_bytes), self.cfg.rollout.transport_timeout_s,
                                      self._stalled)
        return SyncStats(time.perf_counter() - t0, total, buckets, bucket_bytes)

    def _stalled(self) -> str:
        dead = [f"{ch.name}: {why}" for i, ch in enumerate(self.channels) if (why := self._alive(i)()) is not None]
        return "; ".join(dead) if dead else (f"workers {', '.join(ch.name for ch in self.channels)} are alive "
                                             "but did not take part")

    def validate(self, shares: list[list[list[int]]], n: int, max_tokens: int, settings, seed: int) -> list:
        """Per worker, the groups of its share of held-out prompts (token ids)."""
        for ch, ids in zip(self.channels, shares):
            ch.send("validate", prompt_ids=ids, n=n, max_tokens=max_tokens, settings=settings, torch_seed=seed)
        return [self._expect(i, "validated", "validating")["groups"] for i in range(len(self.channels))]

    def close(self) -> None:
        """Ask the workers to exit; end any that do not within 30 s (all of them at once after a failure)."""
        for ch in self.channels:
            try:
                ch.send("close")
            except BridgeError:  # already gone: the wait below reaps (or kills) its process
                pass
        deadline = time.monotonic() + 30
        for p in self.procs:
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.listener.close()
