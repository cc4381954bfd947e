"""``skpo-bench transport``: the trainer -> rollout-worker weight broadcast (``rollout.bridge``) alone.

Rank 0 (this process) broadcasts ``--size-gb`` of bf16 tensors shaped like decoder layers, in
``--bucket-mb`` buckets, to ``--receivers`` processes over a weight group of its own (gloo, or NCCL
with one GPU per process), ``--repeats`` times; each receiver checks the last bytes it got. Prints
seconds and GB/s per push (the median), which is what a disaggregated run's ``time/weight_sync``
adds per step on top of gathering the shards.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-gb", type=float, default=0.5, help="bytes per push (bf16 tensors)")
    parser.add_argument("--bucket-mb", type=int, default=512, help="rollout.weight_sync_bucket_mb")
    parser.add_argument("--receivers", type=int, default=1, help="rollout workers")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--receiver", nargs=3, metavar=("PORT", "RANK", "WORLD"), help=argparse.SUPPRESS)


def _tensors(size_gb: float, device: str) -> list[tuple[str, torch.Tensor]]:
    n = max(int(size_gb * 2**30 / (2 * 4096 * 4096)), 1)  # [4096, 4096] bf16 = 32 MiB each
    g = torch.Generator(device=device).manual_seed(0)
    return [(f"model.layers.{i // 4}.mlp.part{i % 4}.weight",
             torch.randn(4096, 4096, generator=g, device=device).bfloat16()) for i in range(n)]


def _device(backend: str, rank: int) -> str:
    if backend != "nccl":
        return "cpu"
    torch.cuda.set_device(rank % torch.cuda.device_count())
    return "cuda"


def _receive(port: int, rank: int, world: int, backend: str, repeats: int) -> None:
    from megatron_skpo.rollout.bridge import recv_buckets, weight_group

    pg = weight_group("127.0.0.1", port, rank, world, 300, backend)
    device = _device(backend, rank)
    for _ in range(repeats):
        last = None
        for bucket in recv_buckets(pg, 300, device):
            last = bucket[-1][1]
        assert last is not None and bool(torch.isfinite(last.float()).all())


def run(args: argparse.Namespace) -> dict:
    from megatron_skpo.rollout.bridge import send_buckets, weight_group
    from megatron_skpo.rollout.weight_sync import bucketize
    from megatron_skpo.trainer.build import free_port

    if args.receiver:
        _receive(*map(int, args.receiver), args.backend, args.repeats)
        return {"bench": "transport", "receiver": int(args.receiver[1])}
    world = args.receivers + 1
    if args.backend == "nccl" and torch.cuda.device_count() < world:
        raise SystemExit(f"skpo-bench transport: NCCL needs one GPU per process ({world}), "
                         f"this machine has {torch.cuda.device_count()}")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "megatron_skpo.cli.bench", "transport", "--backend",
                               args.backend, "--repeats", str(args.repeats), "--receiver", str(port), str(r),
                               str(world)], stdout=subprocess.DEVNULL) for r in range(1, world)]
    pg = weight_group("127.0.0.1", port, 0, world, 300, args.backend)
    named = _tensors(args.size_gb, _device(args.backend, 0))
    times, nbytes = [], 0
    for _ in range(args.repeats):
        if args.backend == "nccl":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        nbytes, _ = send_buckets(pg, bucketize(named, args.bucket_mb * 2**20), 300, lambda: "a receiver stalled",
                                 named[0][1].device.type)
        if args.backend == "nccl":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    codes = [p.wait(300) for p in procs]
    if any(codes):
        raise RuntimeError(f"skpo-bench transport: receivers exited {codes}")
    sec = statistics.median(times)
    return {"bench": "transport", "backend": args.backend, "receivers": args.receivers, "bytes": nbytes,
            "bucket_mb": args.bucket_mb, "seconds": sec, "GBps": nbytes / 1e9 / sec, "repeats": args.repeats}
