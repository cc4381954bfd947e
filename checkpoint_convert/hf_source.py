"""An HF checkpoint as the on-demand data of a Megatron dist checkpoint (for :mod:`.stream_save`).

The Megatron state dict is first built from ``meta`` tensors by running the very code that later
converts the real data (``from_hf_unit`` -> cast -> vocab padding -> ``shard_entry``) on meta
copies of the HF tensors, so names, shapes, dtypes and TP chunking of the plan and of the data
cannot differ. When the writer asks for a chunk of a unit (a decoder layer, or the
embedding/norm/head group, see :mod:`.units`) it has not converted yet, the source reads only
that unit's HF tensors (:meth:`.hf_io.HFCheckpoint.read`), converts them and keeps the unit's
chunks until each has been handed out once. The writer asks unit by unit (:meth:`order`), so the
memory in flight is one unit: its HF tensors, its full Megatron tensors and its TP chunks.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from checkpoint_convert import hf_io, mcore_io
from checkpoint_convert.stream_save import ChunkKey
from megatron_skpo.model.mappings.sharding import parallel_kind
from megatron_skpo.model.mappings.units import from_hf_unit, mcore_unit


def unit_shards(mapping: ModuleType, tpl: mcore_io.Template, unit: int, hf: dict, tp: int,
                dtype: Optional[torch.dtype]) -> dict[str, list[ShardedTensor]]:
    """Megatron shards (TP-chunked, vocab padded, cast) of every parameter of one unit."""
    mc = from_hf_unit(mapping, tpl.hf_config, unit, hf)
    out = {}
    for name, meta in tpl.params.items():
        if mcore_unit(name) != unit:
            continue
        full = mc.pop(name)
        full = full if dtype is None else full.to(dtype)
        if parallel_kind(name) == "vocab" and full.shape[0] < meta.shape[0]:
            full = torch.cat([full, full.new_zeros(meta.shape[0] - full.shape[0], *full.shape[1:])])
        out[name] = mcore_io.shard_entry(tpl.sharded[name], name, full, tp)
    return out


def _key(st: ShardedTensor) -> ChunkKey:
    return st.key, tuple(int(o) for o in st.global_offset)


class HFUnitSource:
    """:class:`.stream_save.ChunkSource` converting the HF checkpoint ``src`` one unit at a time.

    Args:
        expected: ``{unit: {hf name: meta tensor}}`` (:func:`.checks.expected_hf`), already
            checked against ``src``.
        dtype: cast every Megatron tensor to it (``None``: keep the HF dtype).
    """

    def __init__(self, src: hf_io.HFCheckpoint, mapping: ModuleType, tpl: mcore_io.Template,
                 expected: dict[int, dict], tp: int, dtype: Optional[torch.dtype]):
        self.src, self.mapping, self.tpl, self.tp, self.dtype = src, mapping, tpl, tp, dtype
        self.names = {u: list(names) for u, names in expected.items()}
        # Units in the order their first tensor is stored, so reads move forward through the files.
        first = {u: min(src.files.index(src.tensors[n].file) for n in ns) for u, ns in self.names.items()}
        self.units = sorted(self.names, key=lambda u: (first[u], u))
        self.rank = {u: i for i, u in enumerate(self.units)}
        self.unit_of: dict[ChunkKey, int] = {}
        self.cache: dict[ChunkKey, torch.Tensor] = {}
        self.conversions = 0

    def meta_shards(self) -> dict[str, list[ShardedTensor]]:
        """The whole model's Megatron shards with ``meta`` data (no tensor data is read)."""
        out: dict[str, list[ShardedTensor]] = {}
        for u in self.units:
            hf = {n: torch.empty(self.src.tensors[n].shape, dtype=self.src.tensors[n].dtype, device="meta")
                  for n in self.names[u]}
            for name, shards in unit_shards(self.mapping, self.tpl, u, hf, self.tp, self.dtype).items():
                for st in shards:
                    if _key(st) in self.unit_of:
                        raise ValueError(f"{name}: chunk {_key(st)} planned twice")
                    self.unit_of[_key(st)] = u
                out[name] = shards
        return out

    def order(self, key: ChunkKey) -> int:
        return self.rank[self.unit_of[key]]

    def tensor(self, key: ChunkKey) -> torch.Tensor:
        if key not in self.cache:
            # A new unit: whatever is left of the previous one would be converted again if asked
            # for (correct, only slower); the writer's unit order makes that never happen.
            self.cache = {}
            self.cache = self._convert(self.unit_of[key])
        return self.cache.pop(key)

    def _convert(self, unit: int) -> dict[ChunkKey, torch.Tensor]:
        self.conversions += 1
        hf = self.src.read(self.names[unit])
        shards = unit_shards(self.mapping, self.tpl, unit, hf, self.tp, self.dtype)
        del hf
        return {_key(st): st.data for sts in shards.values() for st in sts}
