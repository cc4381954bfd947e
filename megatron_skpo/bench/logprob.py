"""``skpo-bench logprob``: fused chunked log-prob/entropy vs the naive full-logits path.

Both paths compute log-probs of the targets *and* the entropy, forward and backward (w.r.t. the
hidden states and the output weight). The naive path is what peers do: full ``[T, V/TP]`` fp32
logits, ``log_softmax``, gather. Times are the median of ``--repeats`` runs after a warm-up;
peak memory is measured (see :mod:`megatron_skpo.bench.memory`), above the inputs.

``--tp N`` measures one tensor-parallel rank: it holds a ``V/N`` weight shard; the fused path's
collectives (all-reduces of O(T) floats per rank) are not run, and the naive path computes the
shard's local logits, which is what a vocab-parallel naive implementation holds in memory.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_skpo.bench.memory import peak_bytes
from megatron_skpo.model.logprob import fused_logprob_entropy, naive_logprob_entropy, release_cpu_scratch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=8192, help="T, tokens in the batch")
    parser.add_argument("--hidden", type=int, default=1024, help="H, hidden size")
    parser.add_argument("--vocab", type=int, default=32768, help="V, vocabulary size")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (one rank measured)")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per fused chunk")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)


def _step(fn, hidden, weight, target, **kw):
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    logp, ent = fn(h, w, target, **kw)
    (logp.sum() + ent.sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def _time(fn, device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.vocab % args.tp:
        raise ValueError(f"--vocab {args.vocab} must be divisible by --tp {args.tp}")
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype)
    weight = (torch.randn(args.vocab // args.tp, args.hidden, generator=g) * args.hidden ** -0.5).to(device, dtype)
    target = torch.randint(0, args.vocab // args.tp, (args.tokens,), generator=g).to(device)
    fused = lambda: _step(fused_logprob_entropy, hidden, weight, target, chunk=args.chunk,  # noqa: E731
                          temperature=args.temperature)
    naive = lambda: _step(naive_logprob_entropy, hidden, weight, target,  # noqa: E731
                          temperature=args.temperature)
    diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(fused(), naive())]
    return {
        "bench": "logprob", "device": str(device), "dtype": args.dtype, "tokens": args.tokens,
        "hidden": args.hidden, "vocab": args.vocab, "tp": args.tp, "chunk": args.chunk,
        "fused_seconds": _time(fused, device, args.repeats),
        "naive_seconds": _time(naive, device, args.repeats),
        "fused_peak_bytes": peak_bytes(lambda: (release_cpu_scratch(), fused()), device),  # its buffers included
        "naive_peak_bytes": peak_bytes(naive, device),
        "max_abs_diff_logp": diffs[0], "max_abs_diff_entropy": diffs[1],
        "max_abs_diff_grad_hidden": diffs[2], "max_abs_diff_grad_weight": diffs[3],
    }
