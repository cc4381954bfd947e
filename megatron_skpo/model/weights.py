"""Move HF-named tensors in and out of a TP/PP/EP-sharded Megatron GPTModel.

``load_hf`` maps, pipeline-slices, expert-slices and TP-shards an HF state dict into this rank's
model; ``gather_hf`` all-gathers the shards of any per-parameter tensor (weights, gradients,
optimizer state) and returns full HF-named tensors on every rank. The gather goes through
``all_gather_object`` over the whole world (expert-parallel ranks are data-parallel ranks for
the dense layers): meant for tests, checks and small models, not for streaming a 70B model (the
weight-sync path streams tensor by tensor through the same mapping functions).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_skpo.model.hf_config import moe_spec
from megatron_skpo.model.mappings import get_mapping
from megatron_skpo.model.mappings.sharding import (from_expert_ranks, from_stages, is_expert, shard,
                                                  to_expert_rank, to_stage, unshard)

Tensors = dict[str, torch.Tensor]


def _is_te(model: torch.nn.Module) -> bool:
    return any(k.endswith("linear_qkv.layer_norm_weight") for k in model.state_dict())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _num_experts(hf_config: dict) -> int:
    moe = moe_spec(hf_config)
    return moe.num_experts if moe else 0


def _local(full: Tensors, hf_config: dict, padded_vocab: int) -> Tensors:
    """This rank's slice of a full Megatron state dict: its stage, its experts, its TP shard
    (experts split over the expert-tensor-parallel group, the rest over the TP group)."""
    stage = to_stage(full, ps.get_pipeline_model_parallel_rank(),
                     ps.get_pipeline_model_parallel_world_size(), int(hf_config["num_hidden_layers"]))
    experts = _num_experts(hf_config)
    if experts:
        stage = to_expert_rank(stage, ps.get_expert_model_parallel_rank(),
                               ps.get_expert_model_parallel_world_size(), experts)
    dense = {k: v for k, v in stage.items() if not is_expert(k)}
    expert = {k: v for k, v in stage.items() if is_expert(k)}
    return {**shard(dense, ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                    padded_vocab=padded_vocab),
            **shard(expert, ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
                    padded_vocab=padded_vocab)}


def load_hf(model: torch.nn.Module, hf: Tensors, hf_config: dict) -> None:
    """Copy HF-named tensors into this rank's shard/stage of ``model`` (fp32 or bf16 params)."""
    model = _unwrap(model)
    full = get_mapping(hf_config["model_type"]).from_hf(hf, hf_config, te=_is_te(model))
    local = _local(full, hf_config, model.vocab_size)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(set(own) - set(local))
    if missing:
        raise KeyError(f"load_hf: no HF tensor maps to {missing[:5]}")
    with torch.no_grad():
        for name, target in own.items():
            if local[name].shape != target.shape:
                raise ValueError(f"load_hf: {name} has shape {tuple(target.shape)}, "
                                 f"HF gives {tuple(local[name].shape)}")
            target.copy_(local[name])


def _local_tensors(model: torch.nn.Module, tensor_of: Callable) -> Tensors:
    out = {}
    for name, p in model.named_parameters():
        t = tensor_of(p)
        if t is not None:
            out[name] = t.detach().float().cpu().reshape(p.shape)
    return out


def gather_hf(model: torch.nn.Module, hf_config: dict,
              tensor_of: Optional[Callable[[torch.nn.Parameter], torch.Tensor]] = None) -> Tensors:
    """Full HF-named tensors of ``tensor_of(param)`` (default: the weights) on every rank.

    Collective over the whole world. Each rank contributes its tensors tagged with its pipeline,
    tensor, expert and expert-tensor parallel ranks; the data-parallel copies of a shard are equal
    and the first one seen is used.
    """
    model = _unwrap(model)
    tensor_of = tensor_of or (lambda p: p.data)
    local = _local_tensors(model, tensor_of)
    mine = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
            ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank(),
            {k: v for k, v in local.items() if not is_expert(k)}, {k: v for k, v in local.items() if is_expert(k)})
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    ep, etp = ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
    dense, expert = {}, {}
    for p, t, e, et, d, x in everyone:
        dense.setdefault((p, t), d)
        expert.setdefault((p, e, et), x)
    vocab = int(hf_config["vocab_size"])
    stages = []
    for p in range(pp):
        stage = unshard([dense[(p, t)] for t in range(tp)], vocab)
        experts = _num_experts(hf_config)
        if experts:
            by_ep = [unshard([expert[(p, e, et)] for et in range(etp)], vocab) for e in range(ep)]
            stage.update(from_expert_ranks(by_ep, experts))
        stages.append(stage)
    full = from_stages(stages, int(hf_config["num_hidden_layers"]))
    return get_mapping(hf_config["model_type"]).to_hf(full, hf_config, te=_is_te(model))
