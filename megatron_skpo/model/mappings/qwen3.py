"""Qwen3 dense (``model_type="qwen3"``) <-> Megatron GPTModel: RMSNorm on every query and key head.

``self_attn.{q,k}_norm.weight`` (size head_dim, shared by all heads) become the attention's
``{q,k}_layernorm.weight``, which Megatron applies per head before the rotary embedding, as HF
does. No biases anywhere; the rest is the Llama layout of :mod:`megatron_skpo.model.mappings.common`.
"""
from __future__ import annotations

from megatron_skpo.model.mappings import common
from megatron_skpo.model.mappings.common import Tensors

MODEL_TYPE = "qwen3"


def from_hf(hf: Tensors, hf_config: dict, te: bool = False) -> Tensors:
    """HF ``Qwen3ForCausalLM`` tensors -> full Megatron state dict (local spec, or TE when ``te``)."""
    return common.from_hf(hf, common.arch_from_hf(hf_config, qkv_bias=False, qk_norm=True), te)


def to_hf(mc: Tensors, hf_config: dict, te: bool = False) -> Tensors:
    """Full Megatron state dict -> HF ``Qwen3ForCausalLM`` tensors."""
    return common.to_hf(mc, common.arch_from_hf(hf_config, qkv_bias=False, qk_norm=True), te)
