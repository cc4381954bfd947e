"""Move HF-named tensors in and out of a TP/PP-sharded Megatron GPTModel.

``load_hf`` maps, pipeline-slices and TP-shards an HF state dict into this rank's model;
``gather_hf`` all-gathers the shards of any per-parameter tensor (weights, gradients, optimizer
state) over the model-parallel group and returns full HF-named tensors on every rank. The gather
goes through ``all_gather_object``: meant for tests, checks and small models, not for streaming a
70B model (the weight-sync path streams tensor by tensor through the same mapping functions).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_skpo.model.mappings import get_mapping
from megatron_skpo.model.mappings.sharding import from_stages, shard, to_stage, unshard

Tensors = dict[str, torch.Tensor]


def _is_te(model: torch.nn.Module) -> bool:
    return any(k.endswith("linear_qkv.layer_norm_weight") for k in model.state_dict())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def load_hf(model: torch.nn.Module, hf: Tensors, hf_config: dict) -> None:
    """Copy HF-named tensors into this rank's shard/stage of ``model`` (fp32 or bf16 params)."""
    model = _unwrap(model)
    full = get_mapping(hf_config["model_type"]).from_hf(hf, hf_config, te=_is_te(model))
    stage = to_stage(full, ps.get_pipeline_model_parallel_rank(),
                     ps.get_pipeline_model_parallel_world_size(), int(hf_config["num_hidden_layers"]))
    local = shard(stage, ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                  padded_vocab=model.vocab_size)
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
    """Full HF-named tensors of ``tensor_of(param)`` (default: the weights) on every rank."""
    model = _unwrap(model)
    tensor_of = tensor_of or (lambda p: p.data)
    mine = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
            _local_tensors(model, tensor_of))
    everyone: list = [None] * ps.get_model_parallel_group().size()
    dist.all_gather_object(everyone, mine, group=ps.get_model_parallel_group())
    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    by_rank = {(p, t): sd for p, t, sd in everyone}
    vocab = int(hf_config["vocab_size"])
    stages = [unshard([by_rank[(p, t)] for t in range(tp)], vocab) for p in range(pp)]
    full = from_stages(stages, int(hf_config["num_hidden_layers"]))
    return get_mapping(hf_config["model_type"]).to_hf(full, hf_config, te=_is_te(model))
