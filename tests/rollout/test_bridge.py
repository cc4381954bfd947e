"""The trainer <-> rollout-worker bridge: bucketed weight broadcast over its own gloo group (bit-exact
for every dtype), a stalled or dead receiver turned into an error that names the bucket within the
timeout, and the control channel's liveness and authentication."""
from __future__ import annotations

import subprocess
import sys
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

import pytest
import torch

from mp_helpers import free_port
from megatron_skpo.rollout.bridge import BridgeError, Channel, WorkerLost, send_buckets, send_msg, weight_group

CHILD = Path(__file__).with_name("bridge_child.py")


def start(mode: str, out: Path) -> tuple[subprocess.Popen, object]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(CHILD), str(port), mode, str(out)])
    return proc, weight_group("127.0.0.1", port, 0, 2, timeout_s=20)


def buckets() -> list[list[tuple[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    return [[("model.embed_tokens.weight", torch.randn(7, 5, generator=g).bfloat16()),
             ("model.norm.weight", torch.randn(5, generator=g))],
            [("model.layers.0.mlp.experts.ids", torch.arange(6, dtype=torch.int64).reshape(2, 3)),
             ("model.layers.0.mask", torch.tensor([True, False, True])),
             ("model.layers.0.scalar", torch.tensor(2.5, dtype=torch.float64))],
            [("lm_head.weight", torch.randn(3, 4, generator=g).half())]]


def test_buckets_arrive_bit_exact(tmp_path):
    proc, pg = start("receive", tmp_path / "got.pt")
    total, count = send_buckets(pg, buckets(), 20, lambda: "child")
    assert proc.wait(60) == 0 and count == 3
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    sent = buckets()
    assert total == sum(t.numel() * t.element_size() for b in sent for _, t in b)
    for b_got, b_sent in zip(got, sent, strict=True):
        for (n1, t1), (n2, t2) in zip(b_got, b_sent, strict=True):
            assert n1 == n2 and t1.dtype == t2.dtype and t1.shape == t2.shape and torch.equal(t1, t2)


@pytest.mark.parametrize("mode", ["stall", "die"])
def test_a_stalled_or_dead_worker_is_an_error_naming_the_bucket(tmp_path, mode):
    proc, pg = start(mode, tmp_path / "unused")
    t0 = time.monotonic()
    big = [[("model.layers.0.self_attn.q_proj.weight", torch.zeros(256, 256))]]
    with pytest.raises(BridgeError, match=r"bucket 0 \(1 tensors from model.layers.0.self_attn.q_proj.weight"):
        send_buckets(pg, big * 3, 2.0, lambda: "worker 0 did not take part")
    assert time.monotonic() - t0 < 25  # the timeout (or the closed connection), not a hang
    proc.kill()
    proc.wait()


def test_channel_reports_a_dead_peer_and_refuses_a_wrong_key():
    key = b"k" * 32
    listener = Listener(("127.0.0.1", 0), authkey=key)
    code = ("import sys; from multiprocessing.connection import Client; "
            f"c = Client({listener.address!r}, authkey={key!r}); sys.exit(3)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    conn = listener.accept()
    alive = lambda: None if proc.poll() is None else f"the process exited with code {proc.poll()}"  # noqa: E731
    ch = Channel(conn, "rollout worker 0", alive)
    with pytest.raises(WorkerLost, match="rollout worker 0"):
        ch.recv(30, "generating step 1")
    proc.wait()
    bad = subprocess.Popen([sys.executable, "-c", "from multiprocessing.connection import Client; "
                            f"Client({listener.address!r}, authkey=b'wrong')"], stderr=subprocess.PIPE)
    with pytest.raises(Exception, match="digest"):
        listener.accept()
    bad.wait()
    listener.close()


def test_channel_times_out_on_a_silent_peer_and_relays_a_worker_traceback():
    import threading

    listener = Listener(("127.0.0.1", 0), authkey=b"x" * 32)
    box: list = []
    t = threading.Thread(target=lambda: box.append(Client(listener.address, authkey=b"x" * 32)))
    t.start()  # the handshake needs both ends at once
    ch = Channel(listener.accept(), "rollout worker 1")
    t.join()
    client = box[0]
    with pytest.raises(BridgeError, match="no answer within 1 s while validating"):
        ch.recv(1.0, "validating")
    send_msg(client, "error", {"traceback": "Traceback ...\nValueError: boom"})
    with pytest.raises(BridgeError, match="failed while generating step 2:\nTraceback ...\nValueError: boom"):
        ch.recv(5, "generating step 2")
    listener.close()
