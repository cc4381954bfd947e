"""Strict equivalence check: the same prompts through the HF model and the Megatron checkpoint.

The Megatron side is the real ``GPTModel`` (:func:`megatron_skpo.model.builder.build_gpt_model`)
at tensor-parallel size ``tp`` (and, for MoE models, expert-parallel size ``ep``), loaded with ``dist_checkpointing.load(model.sharded_state_dict())``
exactly as the trainer and Megatron-LM load it (so this also checks resharding when ``tp``
differs from the TP the checkpoint was written for). Both sides run in fp32; the vocab-parallel
logits are gathered over TP and the padding columns dropped. For TP * EP > 1 the ranks are gloo
processes spawned here (the ``ep`` data-parallel replicas all run the prompts: every forward of
an MoE layer is an all-to-all over them).

Metrics over all N prompt positions (``p``: HF, ``q``: Megatron softmax):
    max_abs = max |z_hf - z_mc|,  mean_abs = mean |z_hf - z_mc|,
    kl = KL(p || q) per token (mean and max),  top1 = mean 1[argmax z_hf = argmax z_mc].
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

DEFAULT_PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ", "Question: 12 + 30 = ?\nAnswer:",
                   "Once upon a time, in a small village,")


@dataclass(frozen=True)
class Thresholds:
    """Largest values that still pass (strict defaults: fp32 kernels differ only in sum order)."""

    max_abs: float = 1e-4
    mean_abs: float = 1e-5
    kl_max: float = 1e-6
    top1_min: float = 1.0


def compare_logits(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Metrics between logits ``ref [N, V]`` (HF) and ``got [N, V]`` (Megatron)."""
    diff = (ref.double() - got.double()).abs()
    lp_ref, lp_got = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    kl = (lp_ref.exp() * (lp_ref - lp_got)).sum(-1)
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "kl_mean": kl.mean().item(),
            "kl_max": kl.max().item(), "top1_agreement": (ref.argmax(-1) == got.argmax(-1)).double().mean().item(),
            "tokens": int(ref.shape[0])}


def failures(metrics: dict[str, float], th: Thresholds) -> list[str]:
    bad = [k for k in ("max_abs", "mean_abs", "kl_max") if not metrics[k] <= getattr(th, k)]
    return bad + (["top1_agreement"] if not metrics["top1_agreement"] >= th.top1_min else [])


def prompt_ids(hf_dir: Path, vocab: int, prompts: tuple[str, ...] = DEFAULT_PROMPTS) -> list[torch.Tensor]:
    """Token ids ``[1, S]`` per prompt: the model's tokenizer if it ships one, else seeded random ids."""
    if any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        return [torch.tensor([tok(p)["input_ids"]]) for p in prompts]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, 12 + 4 * i), generator=g) for i in range(len(prompts))]


def hf_logits(hf_dir: Path, prompts: list[torch.Tensor]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.cat([model(input_ids=p).logits[0] for p in prompts])


def _mcore_logits_rank(tp: int, hf_config: dict, ckpt_dir: str, prompts: list[torch.Tensor],
                       ep: int = 1) -> Optional[torch.Tensor]:
    """This rank's part of the Megatron forward; rank 0 returns the gathered ``[N, V]`` logits."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_skpo.model.builder import build_gpt_model, initialize_parallel

    initialize_parallel(tp, 1, ep=ep)
    model = build_gpt_model(hf_config, dtype="fp32", impl="local")
    # Megatron-LM's layout: the model's shards under "model", beside the common entries.
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt_dir)["model"])
    model.eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            pos = torch.arange(ids.shape[1]).unsqueeze(0)
            local = model(input_ids=ids, position_ids=pos, attention_mask=None)[0]  # [S, Vp/TP]
            parts = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
            out.append(torch.cat(parts, -1)[:, : int(hf_config["vocab_size"])])
    return torch.cat(out) if dist.get_rank() == 0 else None


def _worker(rank: int, world: int, port: int, queue, args: tuple) -> None:
    os.environ.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from checkpoint_convert.mcore_io import _cpu_dist_checkpointing

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        _cpu_dist_checkpointing()
        # pickled here: a tensor put on a torch.multiprocessing queue travels as shared memory that
        # vanishes when this process exits, which races with the parent reading it (seen as flakes)
        queue.put((rank, pickle.dumps(_mcore_logits_rank(*args)), None))
    except BaseException:
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def mcore_logits(tp: int, hf_config: dict, ckpt_dir: str, prompts: list[torch.Tensor],
                 timeout_s: float = 600.0, ep: int = 1) -> torch.Tensor:
    """Gathered Megatron logits ``[N, V]``: in this process for TP=EP=1, else ``tp * ep`` gloo processes."""
    args = (tp, hf_config, ckpt_dir, prompts, ep)
    world = tp * ep
    if world == 1:
        from checkpoint_convert.mcore_io import ensure_single_process_group

        ensure_single_process_group()
        return _mcore_logits_rank(*args)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, queue, args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=timeout_s) for _ in range(world)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}:\n{e}" for r, _, e in results if e]
    if errors:
        raise RuntimeError("Megatron forward failed on " + "\n".join(errors))
    return pickle.loads(next(v for r, v, _ in results if r == 0))


def verify(hf_dir: str | Path, mcore_dir: str | Path, tp: int = 1, th: Thresholds = Thresholds(),
           trust_checkpoint: bool = False, ep: int = 1) -> dict:
    """Run both models on the same prompts; the result dict has ``ok`` and the failed metric names.

    The Megatron model loads everything in the checkpoint, pickled byte objects included, so unless
    ``trust_checkpoint`` those are checked first (:func:`.untrusted.check_byte_objects`).
    """
    from checkpoint_convert.mcore_io import check_unchanged, checkpoint_dir, open_mcore
    from checkpoint_convert.untrusted import check_byte_objects, load_dist_metadata

    hf_dir = Path(hf_dir)
    ck = open_mcore(mcore_dir, like=None if (Path(mcore_dir) / "hf" / "config.json").is_file() else hf_dir,
                    trust=trust_checkpoint)
    if not trust_checkpoint:
        check_byte_objects(ck.ckpt_dir, load_dist_metadata(ck.ckpt_dir))
    prompts = prompt_ids(hf_dir, int(ck.hf_config["vocab_size"]))
    ref = hf_logits(hf_dir, prompts)
    check_unchanged(ck)
    got = mcore_logits(tp, ck.hf_config, str(checkpoint_dir(Path(mcore_dir))), prompts, ep=ep)
    metrics = compare_logits(ref, got)
    bad = failures(metrics, th)
    return {"ok": not bad, "failed": bad, **metrics, "tp": tp, "ep": ep, "thresholds": vars(th)}
