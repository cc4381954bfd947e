"""Qwen2/Qwen2.5 (``model_type="qwen2"``) <-> Megatron GPTModel: biases on q/k/v only.

The q/k/v biases are interleaved per query group exactly like the weights
(``linear_qkv.bias``); the output projection and the MLP have none (``add_bias_linear=False``).
"""
from __future__ import annotations

from megatron_skpo.model.mappings import common
from megatron_skpo.model.mappings.common import Tensors

MODEL_TYPE = "qwen2"


def from_hf(hf: Tensors, hf_config: dict, te: bool = False) -> Tensors:
    """HF ``Qwen2ForCausalLM`` tensors -> full Megatron state dict (local spec, or TE when ``te``)."""
    return common.from_hf(hf, common.arch_from_hf(hf_config, qkv_bias=True), te)


def to_hf(mc: Tensors, hf_config: dict, te: bool = False) -> Tensors:
    """Full Megatron state dict -> HF ``Qwen2ForCausalLM`` tensors."""
    return common.to_hf(mc, common.arch_from_hf(hf_config, qkv_bias=True), te)
