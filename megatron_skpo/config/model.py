"""Model and parallelism sections of the config tree."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_skpo.config.base import check, doc


@dataclass
class ModelConfig:
    """The policy model: where its weights come from and how its layers are built."""

    hf_path: Optional[str] = doc(None, "HF checkpoint directory (config.json + safetensors) to start from")
    mcore_path: Optional[str] = doc(
        None, "Megatron distributed checkpoint to start the policy from instead of hf_path's weights (an "
        "`skpo-convert hf-to-mcore` output, or a directory with a dist checkpoint's metadata.json); hf_path is "
        "still read for config.json and the tokenizer (the converter's <out>/hf holds both), not for weights")
    dtype: Literal["bf16", "fp16", "fp32"] = doc("bf16", "compute dtype; master weights stay fp32")
    fp8: Optional[Literal["delayed", "current"]] = doc(None, "FP8 recipe via Transformer Engine (GPU only); null = off")
    transformer_impl: Literal["auto", "transformer_engine", "local"] = doc(
        "auto", "layer spec: auto = Transformer Engine when it imports and CUDA is available, else local")
    recompute: Literal["none", "selective", "full"] = doc("none", "activation recompute granularity")
    trust_remote_code: bool = doc(False, "allow HF remote code when reading configs/tokenizers (off for safety)")
    logprob_chunk_size: int = doc(1024, "tokens per chunk in the fused vocab-parallel log-prob kernel")
    vocab_divisible_by: int = doc(
        128, "pad the vocabulary to a multiple of this times TP (Megatron-LM's rule); padding is masked")
    moe_aux_loss_coef: Optional[float] = doc(
        None, "MoE load-balancing loss coefficient in HF's terms (router_aux_loss_coef); null = as the HF "
        "config applies it: router_aux_loss_coef when output_router_logits is true, else 0 (ignored for dense models)")

    def __post_init__(self):
        check(self.logprob_chunk_size > 0, "model.logprob_chunk_size", "must be > 0")
        check(self.moe_aux_loss_coef is None or self.moe_aux_loss_coef >= 0, "model.moe_aux_loss_coef",
              "must be >= 0 (or null)")
        check(self.vocab_divisible_by > 0, "model.vocab_divisible_by", "must be > 0")
        check(not (self.fp8 and self.transformer_impl == "local"), "model.fp8",
              "needs transformer_impl auto or transformer_engine (FP8 runs through Transformer Engine)")


@dataclass
class ParallelConfig:
    """Model parallelism; data parallelism is world_size / (tp * pp)."""

    tp: int = doc(1, "tensor-parallel size of the trainer")
    pp: int = doc(1, "pipeline-parallel size of the trainer")
    ep: int = doc(1, "expert-parallel size (MoE models): routed experts split over ep data-parallel ranks; "
                  "must divide the data-parallel size and the model's number of experts (checked at start)")
    sequence_parallel: bool = doc(False, "Megatron sequence parallelism (GPU only, needs tp > 1)")
    distributed_optimizer: bool = doc(True, "shard optimizer state over data-parallel ranks")
    share_prompts: bool = doc(True, "pack rows with the same prompt so it is computed once (model/packing.py); "
                                    "local layer spec only: Transformer Engine's varlen attention runs each row")
    micro_batch_tokens: int = doc(8192, "token budget of one packed micro-batch")

    def __post_init__(self):
        check(self.tp >= 1, "parallel.tp", "must be >= 1")
        check(self.pp >= 1, "parallel.pp", "must be >= 1")
        check(self.ep >= 1, "parallel.ep", "must be >= 1")
        check(self.micro_batch_tokens > 0, "parallel.micro_batch_tokens", "must be > 0")
        check(not (self.sequence_parallel and self.tp == 1), "parallel.sequence_parallel", "needs tp > 1")
