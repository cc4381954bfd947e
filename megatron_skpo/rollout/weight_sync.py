"""Megatron -> vLLM weight sync after every policy update, in bounded buckets.

The stream: for one *unit* at a time (the embedding, each decoder layer, the final norm + output
layer), gather its tensor-parallel shards (``all_gather`` per parameter over the TP group, or the
expert-tensor-parallel group for a routed expert, joined by
:mod:`megatron_skpo.model.mappings.sharding`), broadcast it from the pipeline stage that owns it
to every rank (so each vLLM engine, whatever its TP, sees the whole model), ``all_gather`` the
experts of the other expert-parallel ranks (MoE), and rename it to HF names with the converter's
``to_hf`` mapping. Units are packed into buckets of at most
``bucket_bytes`` (a unit larger than that travels alone) and each bucket goes to vLLM's
``load_weights`` through ``reload_weights``: peak extra host/device memory is one bucket plus one
unit, never a full copy of the model. Tensors keep the training dtype (bf16 on GPUs).

The converter's ``to_hf`` maps *full* state dicts; a unit is mapped as a one-layer (or zero-layer)
model whose other tensors are empty placeholders, and only the unit's own HF tensors are kept.

After the last bucket the engine's prefix cache is dropped (its KV came from the old weights). On
platforms with sleep mode the engine is woken for the weights first and for the KV cache after.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_skpo.model.hf_config import moe_spec
from megatron_skpo.model.mappings import get_mapping
from megatron_skpo.model.mappings.common import EMBED, OUTPUT
from megatron_skpo.model.mappings.sharding import is_expert, renumber_expert, stage_layers, unshard_tensor
from megatron_skpo.model.mappings.units import MC_LAYER, hf_unit, mcore_unit, to_hf_unit

Named = list[tuple[str, torch.Tensor]]


@dataclass
class SyncStats:
    seconds: float
    bytes: int
    buckets: int
    max_bucket_bytes: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / max(self.seconds, 1e-9)

    def as_metrics(self) -> dict[str, float]:
        return {"weight_sync/seconds": self.seconds, "weight_sync/GB": self.bytes / 1e9,
                "weight_sync/GBps": self.gb_per_s, "weight_sync/buckets": float(self.buckets)}


def bucketize(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Named]:
    """Pack consecutive tensors into buckets of <= ``bucket_bytes`` without splitting a unit.

    ``named`` must yield each unit's tensors consecutively (both producers here do).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: Named = []
    unit: Named = []
    unit_key: Optional[int] = None
    size = 0

    def unit_bytes() -> int:
        return sum(t.numel() * t.element_size() for _, t in unit)

    for name, tensor in named:
        key = hf_unit(name)
        if unit and key != unit_key:
            if bucket and size + unit_bytes() > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket, size, unit = bucket + unit, size + unit_bytes(), []
        unit_key = key
        unit.append((name, tensor))
    if bucket and unit and size + unit_bytes() > bucket_bytes:
        yield bucket
        bucket = []
    if bucket + unit:
        yield bucket + unit


def push_weights(engine, named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> SyncStats:
    """Stream HF-named tensors into ``engine`` bucket by bucket; drop its prefix cache after.

    ``engine``: a :class:`~megatron_skpo.rollout.engine.VLLMEngine` (``wake_up``, ``load_weights``,
    ``reset_prefix_cache``). An engine put to sleep for training is woken for its weights first
    and for its KV cache after the last bucket; every weight is reloaded, so sleep level 2
    (weights discarded) is safe.
    """
    start = time.perf_counter()
    engine.wake_up(["weights"])
    total = buckets = biggest = 0
    for bucket in bucketize(named, bucket_bytes):
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        engine.load_weights(bucket)
        total, buckets, biggest = total + nbytes, buckets + 1, max(biggest, nbytes)
    engine.wake_up(["kv_cache"])
    engine.reset_prefix_cache()
    return SyncStats(time.perf_counter() - start, total, buckets, biggest)


def unit_to_hf(unit: dict[str, torch.Tensor], hf_config: dict, te: bool = False) -> dict[str, torch.Tensor]:
    """HF tensors of one Megatron unit (full, un-sharded, global layer numbers): one decoder layer,
    or (part of) the embedding / final norm / output layer; the converter's layer-at-a-time mapping."""
    layers = {mcore_unit(k) for k in unit}
    if len(layers) > 1:
        raise ValueError(f"unit_to_hf: a unit holds one decoder layer or the globals, got {sorted(layers)}")
    (layer,) = layers
    return to_hf_unit(get_mapping(hf_config["model_type"]), hf_config, layer, unit, te=te)


def _units(model: torch.nn.Module, layer_offset: int) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """This stage's parameters grouped by unit, with global layer numbers in the names."""
    units: dict[str, list] = {}
    for name, p in model.named_parameters():
        m = MC_LAYER.match(name)
        if m:
            i = int(m.group(1)) + layer_offset
            units.setdefault(f"layer.{i}", []).append((f"decoder.layers.{i}.{m.group(2)}", p))
        else:
            units.setdefault("embed" if name == EMBED else "final", []).append((name, p))
    return units


def _gather_tp(name: str, p: torch.Tensor, tp_group, vocab_size: int) -> torch.Tensor:
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return unshard_tensor(name, [p.detach()], vocab_size)
    parts = [torch.empty_like(p) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, p.detach().contiguous(), group=tp_group)
    return unshard_tensor(name, parts, vocab_size)


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def megatron_to_hf_stream(model: torch.nn.Module, hf_config: dict, *, tp_group=None, pp_group=None,
                          ep_group=None, expert_tp_group=None,
                          te: Optional[bool] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield full HF-named tensors of a TP/PP/EP-sharded Megatron GPTModel, unit by unit, on every rank.

    Collective: every rank of the model-parallel group (with routed experts: every rank of the
    job, as expert-parallel ranks are data-parallel ones) must iterate it to the end, in step.
    Args:
        model: this rank's (unwrapped or DDP-wrapped) ``GPTModel`` shard/stage.
        hf_config: the HF ``config.json`` dict (model_type, vocab_size, num_hidden_layers, ...).
        tp_group, pp_group: Megatron's tensor/pipeline-parallel groups (None = size 1).
        ep_group, expert_tp_group: Megatron's expert-parallel and expert-tensor-parallel groups;
            None: those of ``megatron.core.parallel_state`` when the model has routed experts.
    """
    while hasattr(model, "module"):
        model = model.module
    names = [n for n, _ in model.named_parameters()]
    te = any(n.endswith("linear_qkv.layer_norm_weight") for n in names) if te is None else te
    moe = moe_spec(hf_config)
    if moe is not None:
        from megatron.core import parallel_state as ps

        ep_group = ep_group if ep_group is not None else ps.get_expert_model_parallel_group()
        expert_tp_group = expert_tp_group if expert_tp_group is not None else ps.get_expert_tensor_parallel_group()
    pp = dist.get_world_size(pp_group) if pp_group is not None else 1
    pp_rank = dist.get_rank(pp_group) if pp_group is not None else 0
    offset = stage_layers(int(hf_config["num_hidden_layers"]), pp_rank, pp).start
    mine = _units(model, offset)
    plan = [None] * pp  # every stage's (unit, [(name, shape, dtype)]) list, in stage order
    meta = [(u, [(n, tuple(p.shape), p.dtype) for n, p in ps]) for u, ps in mine.items()]
    if pp > 1:
        dist.all_gather_object(plan, meta, group=pp_group)
    else:
        plan = [meta]
    vocab = int(hf_config["vocab_size"])
    device = next(model.parameters()).device
    for stage, units in enumerate(plan):
        for unit, params in units:
            if unit == "final" and hf_config.get("tie_word_embeddings") and stage != 0:
                params = [x for x in params if x[0] != OUTPUT]  # the tied copy of the embedding
            full = {}
            for name, shape, dtype in params:
                group = expert_tp_group if is_expert(name) else tp_group
                tensor = _gather_tp(name, dict(mine[unit])[name], group, vocab) if stage == pp_rank else None
                if pp > 1:
                    tensor = _broadcast(tensor, name, shape, dtype, vocab, stage, pp_group, device, group)
                if is_expert(name):
                    full.update(_gather_experts(name, tensor, ep_group, moe.num_experts))
                else:
                    full[name] = tensor
            yield from unit_to_hf(full, hf_config, te).items()


def _broadcast(tensor, name, shard_shape, dtype, vocab, stage, pp_group, device, tp_group):
    """Send a full tensor from pipeline stage ``stage`` to every stage."""
    if tensor is None:
        parts = [torch.empty(shard_shape, dtype=dtype, device=device) for _ in range(_size(tp_group))]
        tensor = torch.empty_like(unshard_tensor(name, parts, vocab))
    dist.broadcast(tensor, src=dist.get_global_rank(pp_group, stage), group=pp_group)
    return tensor


def _gather_experts(name: str, tensor: torch.Tensor, ep_group, num_experts: int) -> dict[str, torch.Tensor]:
    """Local expert ``j``'s tensor on every expert-parallel rank ``r`` -> global expert
    ``r * E/ep + j``, under its global name (every rank gets all of them)."""
    ep = _size(ep_group)
    if ep == 1:
        return {name: tensor}
    parts = [torch.empty_like(tensor) for _ in range(ep)]
    dist.all_gather(parts, tensor.contiguous(), group=ep_group)
    per = num_experts // ep
    return {renumber_expert(name, r * per): t for r, t in enumerate(parts)}
