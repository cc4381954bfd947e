"""Mistral (``model_type="mistral"``) <-> Megatron GPTModel: the Llama tensor layout, no biases.

The sliding attention window is an attention setting, not a tensor (see
:func:`megatron_skpo.model.hf_config.sliding_window`), so the weights map exactly as Llama's.
"""
from __future__ import annotations

from megatron_skpo.model.mappings import common
from megatron_skpo.model.mappings.common import Tensors

MODEL_TYPE = "mistral"


def from_hf(hf: Tensors, hf_config: dict, te: bool = False) -> Tensors:
    """HF ``MistralForCausalLM`` tensors -> full Megatron state dict (local spec, or TE when ``te``)."""
    return common.from_hf(hf, common.arch_from_hf(hf_config, qkv_bias=False), te)


def to_hf(mc: Tensors, hf_config: dict, te: bool = False) -> Tensors:
    """Full Megatron state dict -> HF ``MistralForCausalLM`` tensors."""
    return common.to_hf(mc, common.arch_from_hf(hf_config, qkv_bias=False), te)
