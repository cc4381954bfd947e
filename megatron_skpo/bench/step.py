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
    parser.add_argument("--attention", choices=["sdpa", "megatron"], default="sdpa",
                        help="local spec's core attention: torch's fused SDPA, or megatron-core's unfused one")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    parser.add_argument("--reference", choices=["transformers", "none"], default="transformers",
                        help="also time transformers' own model (forward + backward + AdamW) on the same tokens")


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

    tokens, adv = _sequences(cfg, args)
    masks = [torch.ones(args.seq_len) for _ in tokens]
    return [mb.to(device) for mb in pack_sequences(tokens, masks, args.micro_batch_tokens, {"adv": adv})]


def _sequences(cfg: dict, args):
    """The benchmark's token sequences and advantages, each ``[seq_len]``."""
    g = torch.Generator().manual_seed(0)
    n = max(1, args.micro_batch_tokens // args.seq_len) * args.micro_batches
    tokens = [torch.randint(0, cfg["vocab_size"], (args.seq_len,), generator=g) for _ in range(n)]
    return tokens, [torch.randn(args.seq_len, generator=g) for _ in range(n)]


def transformers_step_seconds(cfg: dict, args, device) -> Optional[float]:
    """Median seconds of one step of transformers' own model on the same tokens: per micro-batch a
    forward of its sequences as one batch, the same surrogate loss (-A log pi over full logits),
    backward; then one AdamW step. ``dtype`` as the Megatron run (bf16 weights, no fp32 masters)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    hf_cfg = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    model = AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=dtype, attn_implementation="sdpa").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    tokens, adv = _sequences(cfg, args)
    per_mb = max(1, args.micro_batch_tokens // args.seq_len)
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for k in range(0, len(tokens), per_mb):
            ids, a = torch.stack(tokens[k:k + per_mb]).to(device), torch.stack(adv[k:k + per_mb]).to(device)
            logits = model(ids).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
            (-(a[:, 1:] * logp)).sum().backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


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
                          dtype=dtype, impl=args.impl, recompute=args.recompute, logprob_chunk=args.chunk,
                          sdpa=args.attention == "sdpa")
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
    peak_memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    reference = None
    if args.reference == "transformers" and dist.get_world_size() == 1:
        del policy, mbs  # free the Megatron model before building the reference
        reference = transformers_step_seconds(cfg, args, device)
    tokens = args.seq_len * len(_sequences(cfg, args)[0]) * dist.get_world_size() // (args.tp * args.pp)
    peak = _peak(args)
    achieved = flops_per_token(cfg, args.seq_len) * tokens / seconds
    return {
        "bench": "step", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": args.model, "layers": cfg["num_hidden_layers"], "dtype": dtype, "attention": args.attention,
        "impl": resolve_impl(args.impl), "tp": args.tp, "pp": args.pp, "world": dist.get_world_size(),
        "tokens_per_step": tokens, "step_seconds": seconds, "tokens_per_second": tokens / seconds,
        "model_tflops_per_second": achieved / 1e12,
        "mfu": achieved / (peak * 1e12 * dist.get_world_size()) if peak else None,
        "peak_memory_bytes": peak_memory,
        "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
        "reference": args.reference if reference is not None else None, "reference_step_seconds": reference,
        "step_seconds_over_reference": seconds / reference if reference else None,
    }
