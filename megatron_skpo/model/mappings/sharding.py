"""Tensor-, pipeline- and expert-parallel (un)sharding of a full Megatron GPTModel state dict.

Pure functions over ``dict[str, Tensor]``. Megatron's layouts:
  * column-parallel (``linear_qkv``): dim 0 split in TP equal chunks. The QKV rows are grouped
    per query group (see :mod:`.common`), so a contiguous chunk holds whole groups;
  * gated column-parallel (``linear_fc1`` = ``[gate; up]``, also each expert's): each rank holds
    ``[gate_r; up_r]``;
  * row-parallel (``linear_proj``, ``linear_fc2``, also each expert's): dim 1 split;
  * vocab-parallel (embedding, output layer): vocab padded to ``padded_vocab`` with zero rows,
    then dim 0 split;
  * replicated: the norms (also the per-head q/k norms) and the MoE router.
Experts are split twice: expert-parallel rank ``r`` of ``ep`` holds experts
``r*E/ep .. (r+1)*E/ep - 1`` renumbered from 0 (:func:`to_expert_rank`), and inside each expert
the expert-tensor-parallel ranks split fc1/fc2 as above (Megatron's expert TP size; ours is TP).
Pipeline stages hold an even split of the layers, numbered locally from 0; the first stage holds
the embedding, the last the final norm and the output layer (also when embeddings are tied).
Order of application: :func:`to_stage` (PP), :func:`to_expert_rank` (EP), :func:`shard` (TP).
"""
from __future__ import annotations

import torch

from megatron_skpo.model.mappings.common import EMBED, FINAL_NORM, OUTPUT, Tensors
from megatron_skpo.model.mappings.moe import EXPERT, ROUTER
from megatron_skpo.model.mappings.units import MC_LAYER as _LAYER
_COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
_GATED = ("mlp.linear_fc1.weight",)
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
# "layernorm.weight" covers input/pre-MLP norms and the attention's q_layernorm/k_layernorm
_REPLICATED = ("layernorm.weight", "layer_norm_weight", FINAL_NORM, ROUTER)
_EXPERT_KINDS = {"linear_fc1.weight": "gated", "linear_fc2.weight": "row"}


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron-LM's rule: the vocabulary the embedding and output layers hold across TP is
    ``vocab_size`` rounded up to a multiple of ``divisible_by * tp`` (each TP rank holds an equal
    slice; the extra rows are zero and masked out of every softmax). ``divisible_by <= 0``: no padding."""
    if divisible_by <= 0:
        return vocab_size
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def parallel_kind(name: str) -> str:
    """``vocab`` / ``column`` / ``gated`` / ``row`` / ``replicated`` for a Megatron tensor name."""
    if name in (EMBED, OUTPUT):
        return "vocab"
    m = EXPERT.match(name)
    if m and m.group(3) in _EXPERT_KINDS:
        return _EXPERT_KINDS[m.group(3)]
    for kind, suffixes in (("column", _COLUMN), ("gated", _GATED), ("row", _ROW),
                           ("replicated", _REPLICATED)):
        if name.endswith(suffixes):
            return kind
    raise KeyError(f"no tensor-parallel layout known for Megatron tensor '{name}'")


def shard_tensor(name: str, t: torch.Tensor, rank: int, size: int, padded_vocab: int) -> torch.Tensor:
    """TP rank ``rank``'s slice of the full tensor ``t`` named ``name``."""
    kind = parallel_kind(name)
    if kind == "replicated":
        return t
    if kind == "vocab":
        if padded_vocab < t.shape[0] or padded_vocab % size:
            raise ValueError(f"{name}: padded_vocab {padded_vocab} must be >= {t.shape[0]} and divisible by TP={size}")
        t = torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])
    if kind == "gated":
        gate, up = torch.chunk(t, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, 0)[rank], torch.chunk(up, size, 0)[rank]])
    dim = 1 if kind == "row" else 0
    if t.shape[dim] % size:
        raise ValueError(f"{name}: dim {dim} of size {t.shape[dim]} is not divisible by TP={size}")
    return torch.chunk(t, size, dim=dim)[rank].contiguous()


def unshard_tensor(name: str, parts: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Inverse of :func:`shard_tensor` given every rank's slice (vocab padding removed)."""
    kind = parallel_kind(name)
    if kind == "replicated":
        return parts[0]
    if kind == "gated":
        halves = [torch.chunk(p, 2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    full = torch.cat(parts, dim=1 if kind == "row" else 0)
    return full[:vocab_size] if kind == "vocab" else full


def shard(full: Tensors, rank: int, size: int, padded_vocab: int) -> Tensors:
    return {k: shard_tensor(k, v, rank, size, padded_vocab) for k, v in full.items()}


def unshard(parts: list[Tensors], vocab_size: int) -> Tensors:
    """``parts[r]`` is TP rank r's state dict (same keys on every rank)."""
    return {k: unshard_tensor(k, [p[k] for p in parts], vocab_size) for k in parts[0]}


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Global layer numbers held by pipeline stage ``pp_rank`` (an even split)."""
    if num_layers % pp_size:
        raise ValueError(f"num_layers={num_layers} is not divisible by PP={pp_size}")
    per = num_layers // pp_size
    return range(pp_rank * per, (pp_rank + 1) * per)


def to_stage(full: Tensors, pp_rank: int, pp_size: int, num_layers: int) -> Tensors:
    """Stage ``pp_rank``'s tensors from a full state dict, with local layer numbers."""
    layers = stage_layers(num_layers, pp_rank, pp_size)
    out: Tensors = {}
    for name, t in full.items():
        m = _LAYER.match(name)
        if m:
            if int(m.group(1)) in layers:
                out[f"decoder.layers.{int(m.group(1)) - layers.start}.{m.group(2)}"] = t
        elif name == EMBED and pp_rank == 0 or name in (FINAL_NORM, OUTPUT) and pp_rank == pp_size - 1:
            out[name] = t
    return out


def from_stages(stages: list[Tensors], num_layers: int) -> Tensors:
    """Inverse of :func:`to_stage`: ``stages[p]`` is stage p's state dict."""
    out: Tensors = {}
    for pp_rank, sd in enumerate(stages):
        first = stage_layers(num_layers, pp_rank, len(stages)).start
        for name, t in sd.items():
            m = _LAYER.match(name)
            key = f"decoder.layers.{int(m.group(1)) + first}.{m.group(2)}" if m else name
            out.setdefault(key, t)  # the embedding (first stage) wins over a tied copy
    return out


def is_expert(name: str) -> bool:
    """A routed expert's tensor (split over expert-parallel ranks), by its Megatron name."""
    return EXPERT.match(name) is not None


def renumber_expert(name: str, offset: int) -> str:
    """``...local_experts.{j}.rest`` -> ``...local_experts.{j + offset}.rest``."""
    m = EXPERT.match(name)
    return f"{m.group(1)}{int(m.group(2)) + offset}.{m.group(3)}"


def expert_range(num_experts: int, ep_rank: int, ep_size: int) -> range:
    """Global expert numbers held by expert-parallel rank ``ep_rank`` (an even split)."""
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by EP={ep_size}")
    per = num_experts // ep_size
    return range(ep_rank * per, (ep_rank + 1) * per)


def to_expert_rank(full: Tensors, ep_rank: int, ep_size: int, num_experts: int) -> Tensors:
    """Expert-parallel rank ``ep_rank``'s tensors: its experts renumbered from 0, the rest as is."""
    mine = expert_range(num_experts, ep_rank, ep_size)
    out: Tensors = {}
    for name, t in full.items():
        m = EXPERT.match(name)
        if m is None:
            out[name] = t
        elif int(m.group(2)) in mine:
            out[renumber_expert(name, -mine.start)] = t
    return out


def from_expert_ranks(parts: list[Tensors], num_experts: int) -> Tensors:
    """Inverse of :func:`to_expert_rank`: ``parts[r]`` is EP rank r's state dict."""
    out: Tensors = {}
    for ep_rank, sd in enumerate(parts):
        first = expert_range(num_experts, ep_rank, len(parts)).start
        for name, t in sd.items():
            out.setdefault(renumber_expert(name, first) if is_expert(name) else name, t)
    return out
