"""Routed-expert decoders (every family whose spec has ``mapping="moe_decoder"``: Qwen3-MoE) <->
Megatron GPTModel: the dense family's attention (for Qwen3-MoE, per-head q/k RMSNorm, no biases) and,
in every layer, a softmax top-k router over routed SwiGLU experts with no shared expert
(:mod:`megatron_skpo.model.mappings.moe`)."""
from __future__ import annotations

from megatron_skpo.model.hf_config import moe_spec
from megatron_skpo.model.mappings import common, dense
from megatron_skpo.model.mappings.common import Tensors
from megatron_skpo.model.mappings.moe import moe_mlp_from_hf, moe_mlp_to_hf


def from_hf(hf: Tensors, hf_config: dict, te: bool = False) -> Tensors:
    """HF ``*MoeForCausalLM`` tensors -> full Megatron state dict (local spec, or TE when ``te``)."""
    a, experts = dense.arch(hf_config), moe_spec(hf_config).num_experts
    out = common.globals_from_hf(hf, a)
    for i in range(a.num_layers):
        out.update(common.attention_from_hf(hf, a, i, te))
        out.update(moe_mlp_from_hf(hf, i, experts))
    return out


def to_hf(mc: Tensors, hf_config: dict, te: bool = False) -> Tensors:
    """Full Megatron state dict -> HF ``*MoeForCausalLM`` tensors (per-expert names)."""
    a, experts = dense.arch(hf_config), moe_spec(hf_config).num_experts
    out = common.globals_to_hf(mc, a)
    for i in range(a.num_layers):
        out.update(common.attention_to_hf(mc, a, i, te))
        out.update(moe_mlp_to_hf(mc, i, experts))
    return out
