"""Shared HF <-> Megatron GPTModel tensor mapping for Llama-like decoders, and TP/PP (un)sharding.

Pure functions over ``dict[str, Tensor]``: no process groups, no model objects, so the converter
CLI and the rollout weight sync can stream through them tensor by tensor.

Megatron names (the "full" state dict: TP=1, PP=1, global layer numbers, unpadded vocab):
  ``embedding.word_embeddings.weight``                        <- ``model.embed_tokens.weight``
  ``decoder.layers.{i}.input_layernorm.weight``               <- ``model.layers.{i}.input_layernorm.weight``
     (TE spec: ``decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight``)
  ``decoder.layers.{i}.self_attention.linear_qkv.{weight,bias}`` <- q/k/v_proj, interleaved per
     query group: ``[q_g0 (heads/groups * d), k_g0 (d), v_g0 (d), q_g1, ...]`` (GQA layout)
  ``decoder.layers.{i}.self_attention.linear_proj.weight``    <- ``self_attn.o_proj.weight``
  ``decoder.layers.{i}.pre_mlp_layernorm.weight``             <- ``post_attention_layernorm.weight``
     (TE spec: ``decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight``)
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


@dataclass(frozen=True)
class Arch:
    """The shape facts the mapping needs (read from the HF config by :func:`arch_from_hf`)."""

    num_layers: int
    num_heads: int
    num_groups: int
    head_dim: int
    tied: bool
    qkv_bias: bool


def arch_from_hf(hf: dict, qkv_bias: bool) -> Arch:
    heads = int(hf["num_attention_heads"])
    return Arch(num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
                num_groups=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
                tied=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias)


def _norm_names(te: bool) -> tuple[str, str]:
    if te:
        return "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    return "input_layernorm.weight", "pre_mlp_layernorm.weight"


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


def from_hf(hf: Tensors, a: Arch, te: bool = False) -> Tensors:
    """HF-named tensors -> the full Megatron state dict (see the module docstring)."""
    out = {EMBED: hf["model.embed_tokens.weight"], FINAL_NORM: hf["model.norm.weight"]}
    out[OUTPUT] = hf["model.embed_tokens.weight"] if a.tied else hf["lm_head.weight"]
    ln1, ln2 = _norm_names(te)
    for i in range(a.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + ln1] = hf[h + "input_layernorm.weight"]
        out[m + ln2] = hf[h + "post_attention_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = interleave_qkv(
            *(hf[f"{h}self_attn.{p}_proj.weight"] for p in "qkv"), a)
        if a.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = interleave_qkv(
                *(hf[f"{h}self_attn.{p}_proj.bias"] for p in "qkv"), a)
        out[m + "self_attention.linear_proj.weight"] = hf[h + "self_attn.o_proj.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]], dim=0)
        out[m + "mlp.linear_fc2.weight"] = hf[h + "mlp.down_proj.weight"]
    return out


def to_hf(mc: Tensors, a: Arch, te: bool = False) -> Tensors:
    """The full Megatron state dict -> HF-named tensors (tied: no ``lm_head.weight``, as HF saves)."""
    out = {"model.embed_tokens.weight": mc[EMBED], "model.norm.weight": mc[FINAL_NORM]}
    if not a.tied:
        out["lm_head.weight"] = mc[OUTPUT]
    ln1, ln2 = _norm_names(te)
    for i in range(a.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[h + "input_layernorm.weight"] = mc[m + ln1]
        out[h + "post_attention_layernorm.weight"] = mc[m + ln2]
        names = ("weight", "bias") if a.qkv_bias else ("weight",)
        for kind in names:
            q, k, v = split_qkv(mc[f"{m}self_attention.linear_qkv.{kind}"], a)
            out.update({f"{h}self_attn.q_proj.{kind}": q, f"{h}self_attn.k_proj.{kind}": k,
                        f"{h}self_attn.v_proj.{kind}": v})
        out[h + "self_attn.o_proj.weight"] = mc[m + "self_attention.linear_proj.weight"]
        gate, up = torch.chunk(mc[m + "mlp.linear_fc1.weight"], 2, dim=0)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = mc[m + "mlp.linear_fc2.weight"]
    return out
