"""Llama 2/3/3.x (``model_type="llama"``) <-> Megatron GPTModel: no attention biases.

Layout details (QKV interleaving per query group, gate/up fusion, TE norm names) are shared with
the other Llama-like decoders in :mod:`megatron_skpo.model.mappings.common`.
"""
from __future__ import annotations

from megatron_skpo.model.mappings import common
from megatron_skpo.model.mappings.common import Tensors

MODEL_TYPE = "llama"


def from_hf(hf: Tensors, hf_config: dict, te: bool = False) -> Tensors:
    """HF ``LlamaForCausalLM`` tensors -> full Megatron state dict (local spec, or TE when ``te``)."""
    return common.from_hf(hf, common.arch_from_hf(hf_config, qkv_bias=False), te)


def to_hf(mc: Tensors, hf_config: dict, te: bool = False) -> Tensors:
    """Full Megatron state dict -> HF ``LlamaForCausalLM`` tensors."""
    return common.to_hf(mc, common.arch_from_hf(hf_config, qkv_bias=False), te)
