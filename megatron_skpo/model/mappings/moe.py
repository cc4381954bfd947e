"""The routed-expert MLP of one decoder layer, HF <-> Megatron (``MoELayer`` with ``SequentialMLP``).

Megatron names of layer ``i`` (full state dict: every expert, numbered globally ``0..E-1``; an
expert-parallel rank holds a contiguous block renumbered from 0, see :mod:`.sharding`):
  ``decoder.layers.{i}.pre_mlp_layernorm.weight``   <- ``post_attention_layernorm.weight``
     (a separate norm in the Transformer Engine spec too: TE fuses it only into a dense fc1)
  ``decoder.layers.{i}.mlp.router.weight [E, H]``    <- ``mlp.gate.weight``
  ``decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc1.weight`` <- ``cat([gate_proj, up_proj])``
     of ``mlp.experts.{j}``
  ``decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc2.weight`` <- ``mlp.experts.{j}.down_proj.weight``
The HF names are those of the checkpoints on the Hub and of ``save_pretrained`` in transformers 5
(which fuses the experts into 3-D tensors in memory but saves them per expert), and of vLLM's
``load_weights``.
"""
from __future__ import annotations

import re

from megatron_skpo.model.mappings.common import PRE_MLP_NORM, Tensors, swiglu_from_hf, swiglu_to_hf

ROUTER = "mlp.router.weight"
EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)\.(.+)$")


def expert_prefix(i: int, j: int) -> str:
    return f"decoder.layers.{i}.mlp.experts.local_experts.{j}."


def moe_mlp_from_hf(hf: Tensors, i: int, num_experts: int) -> Tensors:
    """Layer ``i``'s post-attention norm, router and ``num_experts`` experts."""
    h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    out = {m + PRE_MLP_NORM: hf[h + "post_attention_layernorm.weight"], m + ROUTER: hf[h + "mlp.gate.weight"]}
    for j in range(num_experts):
        out.update(swiglu_from_hf(hf, f"{h}mlp.experts.{j}.", expert_prefix(i, j)))
    return out


def moe_mlp_to_hf(mc: Tensors, i: int, num_experts: int) -> Tensors:
    """Inverse of :func:`moe_mlp_from_hf`."""
    h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    out = {h + "post_attention_layernorm.weight": mc[m + PRE_MLP_NORM], h + "mlp.gate.weight": mc[m + ROUTER]}
    for j in range(num_experts):
        out.update(swiglu_to_hf(mc, expert_prefix(i, j), f"{h}mlp.experts.{j}."))
    return out
