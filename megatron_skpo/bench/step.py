"""``skpo-bench step``: time the policy's training step (packed micro-batches, fused log-probs,
Megatron DDP + optimizer) on random weights and tokens; tokens/s and, on GPU, MFU.

Single process by default (a 1-rank gloo/nccl group); under ``torchrun`` it uses the launched
world with ``--tp``/``--pp``. MFU counts model FLOPs per trained token, 3x the forward's
``2 * matmul params + 2 * layers * (causal mean context) * 2 * heads * head_dim`` (attention
scores and values; the fused log-prob's recomputed output matmul is not counted, as recompute
never is), against the device's dense bf16 peak (``--peak-tflops``, or known for H100/H200/A100).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Optional

import torch
import torch.distributed as dist

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-llama", help="preset name or path to an HF config.json")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--micro-batch-tokens", type=int, default=4096, help="packing budget")
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    parser.add_argument("--impl", choices=["auto", "transformer_engine", "local"], default="auto")
    parser.add_argument("--chunk", type=int, default=1024, help="fused log-prob chunk")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")


def _hf_config(args) -> dict:
    from megatron_skpo.model.presets import PRESETS, shape

    if args.model in PRESETS:
        return shape(args.model, args.layers)
    with open(args.model, encoding="utf-8") as f:
        cfg = json.load(f)
    if args.layers is not None:
        cfg["num_hidden_layers"] = args.layers
    return cfg


def flops_per_token(cfg: dict, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), see the module docstring."""
    h, layers, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    per_layer = h * (heads * d) * 2 + h * (kv * d) * 2 + 3 * h * cfg["intermediate_size"]
    matmul_params = layers * per_layer + v * h
    attention = 2 * layers * (seq_len / 2) * 2 * heads * d
    return 3 * (2 * matmul_params + attention)


def _init_distributed(device: torch.device) -> None:
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)


def _batches(cfg: dict, args, device):
    from megatron_skpo.model.packing import pack_sequences

    g = torch.Generator().manual_seed(0)
    per_mb = max(1, args.micro_batch_tokens // args.seq_len)
    n = per_mb * args.micro_batches
    tokens = [torch.randint(0, cfg["vocab_size"], (args.seq_len,), generator=g) for _ in range(n)]
    masks = [torch.ones(args.seq_len) for _ in range(n)]
    adv = [torch.randn(args.seq_len, generator=g) for _ in range(n)]
    return [mb.to(device) for mb in pack_sequences(tokens, masks, args.micro_batch_tokens, {"adv": adv})]


def _loss(logp, entropy, batch):
    mask = batch.loss_mask
    return (-(batch.token_values["adv"] * logp) * mask).sum(), {}


def _peak(args) -> Optional[float]:
    if args.peak_tflops:
        return args.peak_tflops
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def run(args: argparse.Namespace) -> dict:
    from megatron_skpo.config.train import OptimConfig
    from megatron_skpo.model.builder import initialize_parallel, resolve_impl
    from megatron_skpo.model.train_step import build_policy, train_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    _init_distributed(device)
    initialize_parallel(args.tp, args.pp, seed=0)
    cfg = _hf_config(args)
    policy = build_policy(cfg, OptimConfig(lr=1e-6, warmup_steps=0), total_steps=args.steps + 1,
                          dtype=dtype, impl=args.impl, recompute=args.recompute, logprob_chunk=args.chunk)
    mbs = _batches(cfg, args, device)
    times = []
    for step in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = train_step(policy, mbs, _loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = sum(mb.num_tokens for mb in mbs) * dist.get_world_size() // (args.tp * args.pp)
    peak = _peak(args)
    achieved = flops_per_token(cfg, args.seq_len) * tokens / seconds
    return {
        "bench": "step", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": args.model, "layers": cfg["num_hidden_layers"], "dtype": dtype,
        "impl": resolve_impl(args.impl), "tp": args.tp, "pp": args.pp, "world": dist.get_world_size(),
        "tokens_per_step": tokens, "step_seconds": seconds, "tokens_per_second": tokens / seconds,
        "model_tflops_per_second": achieved / 1e12,
        "mfu": achieved / (peak * 1e12 * dist.get_world_size()) if peak else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
    }
