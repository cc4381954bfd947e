"""Rollout (generation) section of the config tree."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_skpo.config.base import check, doc


@dataclass
class RolloutConfig:
    """Sampling with vLLM between training phases."""

    engine: Literal["vllm"] = doc("vllm", "generation backend")
    tp: int = doc(1, "vLLM tensor-parallel size (may differ from training's)")
    temperature: float = doc(1.0, "sampling temperature (the trainer's log-probs use the same)")
    top_p: float = doc(1.0, "nucleus sampling; < 1 makes sampler log-probs those of the processed distribution")
    top_k: int = doc(-1, "top-k sampling; -1 = off")
    max_prompt_tokens: int = doc(1024, "longest prompt; longer prompts are handled by data.invalid_policy")
    max_response_tokens: int = doc(3072, "longest response")
    gpu_memory_utilization: float = doc(0.5, "fraction of GPU memory vLLM may take")
    enforce_eager: bool = doc(False, "disable CUDA graphs / torch.compile in vLLM (faster start on CPU)")
    sleep_between_phases: bool = doc(True, "free vLLM memory during training where the platform supports it")
    weight_sync_bucket_mb: int = doc(512, "bucket size for Megatron -> vLLM weight streaming")

    def __post_init__(self):
        check(self.temperature > 0, "rollout.temperature", "must be > 0")
        check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        check(self.top_k == -1 or self.top_k > 0, "rollout.top_k", "must be -1 (off) or > 0")
        check(self.max_response_tokens > 0, "rollout.max_response_tokens", "must be > 0")
        check(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
        check(self.tp >= 1, "rollout.tp", "must be >= 1")
