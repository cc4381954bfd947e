"""Dense Llama-like decoders (every family whose spec has ``mapping="dense"``: Llama, Mistral, Qwen2,
Qwen3) <-> Megatron GPTModel.

The tensor layout is :mod:`megatron_skpo.model.mappings.common`'s; the family spec
(:mod:`megatron_skpo.model.families`) adds what differs: biases on q/k/v (Qwen2), RMSNorm on every
query and key head (Qwen3: ``self_attn.{q,k}_norm.weight`` become ``{q,k}_layernorm.weight``, applied
per head before the rotary embedding, as HF does). Mistral's sliding window is an attention setting,
not a tensor, so its weights map exactly as Llama's.
"""
from __future__ import annotations

from megatron_skpo.model.families import get_family
from megatron_skpo.model.mappings import common
from megatron_skpo.model.mappings.common import Tensors


def arch(hf_config: dict) -> common.Arch:
    spec = get_family(hf_config["model_type"])
    return common.arch_from_hf(hf_config, qkv_bias=spec.qkv_bias, qk_norm=spec.qk_norm)


def from_hf(hf: Tensors, hf_config: dict, te: bool = False) -> Tensors:
    """HF ``*ForCausalLM`` tensors -> full Megatron state dict (local spec, or TE when ``te``)."""
    return common.from_hf(hf, arch(hf_config), te)


def to_hf(mc: Tensors, hf_config: dict, te: bool = False) -> Tensors:
    """Full Megatron state dict -> HF ``*ForCausalLM`` tensors."""
    return common.to_hf(mc, arch(hf_config), te)
