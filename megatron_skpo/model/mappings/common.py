"""Shared HF <-> Megatron GPTModel tensor mapping for Llama-like decoders, as composable parts.

Pure functions over ``dict[str, Tensor]``: no process groups, no model objects, so the converter
CLI and the rollout weight sync can stream through them tensor by tensor. An architecture module
composes :func:`globals_from_hf`, :func:`attention_from_hf` and an MLP part per layer (this
module's dense :func:`dense_mlp_from_hf`, or :mod:`.moe`'s routed experts), and the inverses.

Megatron names (the "full" state dict: TP=1, PP=1, EP=1, global layer numbers, unpadded vocab):
  ``embedding.word_embeddings.weight``                        <- ``model.embed_tokens.weight``
  ``decoder.layers.{i}.input_layernorm.weight``               <- ``model.layers.{i}.input_layernorm.weight``
     (TE spec: ``decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight``)
  ``decoder.layers.{i}.self_attention.linear_qkv.{weight,bias}`` <- q/k/v_proj, interleaved per
     query group: ``[q_g0 (heads/groups * d), k_g0 (d), v_g0 (d), q_g1, ...]`` (GQA layout)
  ``decoder.layers.{i}.self_attention.{q,k}_layernorm.weight`` <- ``self_attn.{q,k}_norm.weight``
     (Qwen3: one RMSNorm of size head_dim shared by every head; same name in both specs)
  ``decoder.layers.{i}.self_attention.linear_proj.weight``    <- ``self_attn.o_proj.weight``
  ``decoder.layers.{i}.pre_mlp_layernorm.weight``             <- ``post_attention_layernorm.weight``
     (TE spec, dense MLP: ``decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight``)
  ``decoder.layers.{i}.mlp.linear_fc1.weight``                <- ``cat([gate_proj, up_proj])``
  ``decoder.layers.{i}.mlp.linear_fc2.weight``                <- ``mlp.down_proj.weight``
  ``decoder.final_layernorm.weight``                          <- ``model.norm.weight``
  ``output_layer.weight``                                     <- ``lm_head.weight`` (tied: the embedding)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Tensors = dict[str, torch.Tensor]
EMBED, OUTPUT, FINAL_NORM = "embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"
PRE_MLP_NORM = "pre_mlp_layernorm.weight"


@dataclass(frozen=True)
class Arch:
    """The shape facts the mapping needs (read from the HF config by :func:`arch_from_hf`)."""

    num_layers: int
    num_heads: int
    num_groups: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool = False


def arch_from_hf(hf: dict, qkv_bias: bool, qk_norm: bool = False) -> Arch:
    heads = int(hf["num_attention_heads"])
    return Arch(num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
                num_groups=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
                tied=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias, qk_norm=qk_norm)


def input_norm_name(te: bool) -> str:
    return "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"


def dense_pre_mlp_norm_name(te: bool) -> str:
    """The dense MLP's norm: fused into ``linear_fc1`` by Transformer Engine's spec."""
    return "mlp.linear_fc1.layer_norm_weight" if te else PRE_MLP_NORM


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: Arch) -> torch.Tensor:
    """HF ``q [nh*d, ...]``, ``k, v [ng*d, ...]`` -> Megatron ``[ng*(nh/ng+2)*d, ...]`` by group."""
    rest = q.shape[1:]
    q = q.reshape(a.num_groups, (a.num_heads // a.num_groups) * a.head_dim, *rest)
    k = k.reshape(a.num_groups, a.head_dim, *rest)
    v = v.reshape(a.num_groups, a.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, a: Arch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_qkv`."""
    rest = qkv.shape[1:]
    per_group = (a.num_heads // a.num_groups) * a.head_dim
    grouped = qkv.reshape(a.num_groups, per_group + 2 * a.head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group, a.head_dim, a.head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def globals_from_hf(hf: Tensors, a: Arch) -> Tensors:
    """Embedding, final norm and output layer (the embedding again when tied)."""
    out = {EMBED: hf["model.embed_tokens.weight"], FINAL_NORM: hf["model.norm.weight"]}
    out[OUTPUT] = hf["model.embed_tokens.weight"] if a.tied else hf["lm_head.weight"]
    return out


def globals_to_hf(mc: Tensors, a: Arch) -> Tensors:
    """Inverse of :func:`globals_from_hf` (tied: no ``lm_head.weight``, as HF saves)."""
    out = {"model.embed_tokens.weight": mc[EMBED], "model.norm.weight": mc[FINAL_NORM]}
    if not a.tied:
        out["lm_head.weight"] = mc[OUTPUT]
    return out


def attention_from_hf(hf: Tensors, a: Arch, i: int, te: bool) -> Tensors:
    """Layer ``i``'s input norm and self-attention (fused QKV, its bias, q/k norms, output proj)."""
    h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    out = {m + input_norm_name(te): hf[h + "input_layernorm.weight"],
           m + "self_attention.linear_qkv.weight": interleave_qkv(
               *(hf[f"{h}self_attn.{p}_proj.weight"] for p in "qkv"), a),
           m + "self_attention.linear_proj.weight": hf[h + "self_attn.o_proj.weight"]}
    if a.qkv_bias:
        out[m + "self_attention.linear_qkv.bias"] = interleave_qkv(
            *(hf[f"{h}self_attn.{p}_proj.bias"] for p in "qkv"), a)
    if a.qk_norm:
        out[m + "self_attention.q_layernorm.weight"] = hf[h + "self_attn.q_norm.weight"]
        out[m + "self_attention.k_layernorm.weight"] = hf[h + "self_attn.k_norm.weight"]
    return out


def attention_to_hf(mc: Tensors, a: Arch, i: int, te: bool) -> Tensors:
    """Inverse of :func:`attention_from_hf` (q/k/v are views of the fused tensor)."""
    h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    out = {h + "input_layernorm.weight": mc[m + input_norm_name(te)],
           h + "self_attn.o_proj.weight": mc[m + "self_attention.linear_proj.weight"]}
    for kind in ("weight", "bias") if a.qkv_bias else ("weight",):
        q, k, v = split_qkv(mc[f"{m}self_attention.linear_qkv.{kind}"], a)
        out.update({f"{h}self_attn.q_proj.{kind}": q, f"{h}self_attn.k_proj.{kind}": k,
                    f"{h}self_attn.v_proj.{kind}": v})
    if a.qk_norm:
        out[h + "self_attn.q_norm.weight"] = mc[m + "self_attention.q_layernorm.weight"]
        out[h + "self_attn.k_norm.weight"] = mc[m + "self_attention.k_layernorm.weight"]
    return out


def swiglu_from_hf(hf: Tensors, hf_prefix: str, mc_prefix: str) -> Tensors:
    """One gated MLP: ``linear_fc1 = cat([gate_proj, up_proj])``, ``linear_fc2 = down_proj``."""
    return {mc_prefix + "linear_fc1.weight": torch.cat(
                [hf[hf_prefix + "gate_proj.weight"], hf[hf_prefix + "up_proj.weight"]], dim=0),
            mc_prefix + "linear_fc2.weight": hf[hf_prefix + "down_proj.weight"]}


def swiglu_to_hf(mc: Tensors, mc_prefix: str, hf_prefix: str) -> Tensors:
    gate, up = torch.chunk(mc[mc_prefix + "linear_fc1.weight"], 2, dim=0)
    return {hf_prefix + "gate_proj.weight": gate, hf_prefix + "up_proj.weight": up,
            hf_prefix + "down_proj.weight": mc[mc_prefix + "linear_fc2.weight"]}


def dense_mlp_from_hf(hf: Tensors, i: int, te: bool) -> Tensors:
    """Layer ``i``'s post-attention norm and dense SwiGLU MLP."""
    h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    return {m + dense_pre_mlp_norm_name(te): hf[h + "post_attention_layernorm.weight"],
            **swiglu_from_hf(hf, h + "mlp.", m + "mlp.")}


def dense_mlp_to_hf(mc: Tensors, i: int, te: bool) -> Tensors:
    h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    return {h + "post_attention_layernorm.weight": mc[m + dense_pre_mlp_norm_name(te)],
            **swiglu_to_hf(mc, m + "mlp.", h + "mlp.")}


def from_hf(hf: Tensors, a: Arch, te: bool = False) -> Tensors:
    """HF-named tensors of a dense decoder -> the full Megatron state dict (module docstring)."""
    out = globals_from_hf(hf, a)
    for i in range(a.num_layers):
        out.update(attention_from_hf(hf, a, i, te))
        out.update(dense_mlp_from_hf(hf, i, te))
    return out


def to_hf(mc: Tensors, a: Arch, te: bool = False) -> Tensors:
    """The full Megatron state dict of a dense decoder -> HF-named tensors."""
    out = globals_to_hf(mc, a)
    for i in range(a.num_layers):
        out.update(attention_to_hf(mc, a, i, te))
        out.update(dense_mlp_to_hf(mc, i, te))
    return out
