"""Megatron's ``torch_dist`` checkpoint format written with tensor data produced on demand.

``dist_checkpointing.save`` takes a state dict of real tensors, and its default strategy
(``TorchDistSaveShardedStrategy`` with ``FileSystemWriterAsync``) copies every tensor into its
write buckets before writing the first byte, so a converter handing it the whole model holds the
model about twice. :class:`StreamingSaveStrategy` keeps everything of that strategy that decides
what loaders see -- the MCore -> PyTorch-DCP translation (``mcore_to_pyt_state_dict``), the
``MCoreSavePlanner``, Megatron's planning and finalisation (``save_state_dict_async_plan`` /
``save_state_dict_async_finalize``: the same ``.metadata``), its writer's ``finish``, the
``torch.save`` item serialisation, backend ``torch_dist`` version 1 in ``metadata.json`` -- and
changes only *when the bytes exist*: the state dict holds ``meta`` tensors (shape and dtype only),
and each chunk's data is asked of a :class:`ChunkSource` just before it is written, in the
source's preferred order. Only one file is written per rank (``thread_count=1``); how many
``.distcp`` files there are is recorded in ``.metadata`` and invisible to loaders.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Protocol

import torch
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.state_dict_saver import (
    save_state_dict_async_finalize,
    save_state_dict_async_plan,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

ChunkKey = tuple[str, tuple[int, ...]]  # (sharded key, global offset incl. prepended axes)


def chunk_key(index: MetadataIndex) -> ChunkKey:
    return index.fqn, tuple(int(o) for o in index.offset)


class ChunkSource(Protocol):
    """Where the data of each saved chunk comes from."""

    def order(self, key: ChunkKey) -> int:
        """Write position class of a chunk (chunks are written in increasing order)."""

    def tensor(self, key: ChunkKey) -> torch.Tensor:
        """The chunk's data, ``local_shape`` of its ShardedTensor, the dtype it was declared with."""


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``torch.save`` writes a view's whole storage: copy views (as Megatron's writer does)."""
    t = t.detach()
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


class StreamingWriter(FileSystemWriterAsync):
    """``FileSystemWriterAsync`` whose write step asks ``source`` for each tensor while writing."""

    def __init__(self, path: str | Path, source: ChunkSource):
        super().__init__(path, thread_count=1)
        self.source = source
        self.items: list[WriteItem] = []
        self.file_name = ""
        self.results: list[WriteResult] = []

    def prepare_write_data(self, plan: SavePlan, planner: SavePlanner) -> None:
        """Only plan the order here (Megatron's writer resolves and copies every tensor here)."""
        self.planner = planner
        self.file_name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        tensors = [w for w in plan.items if w.type != WriteItemType.BYTE_IO]
        tensors.sort(key=lambda w: self.source.order(chunk_key(w.index)))  # stable: plan order within
        self.items = [w for w in plan.items if w.type == WriteItemType.BYTE_IO] + tensors

    def _data(self, item: WriteItem):
        if item.type == WriteItemType.BYTE_IO:
            return self.planner.resolve_data(item)
        declared = item.tensor_data
        t = self.source.tensor(chunk_key(item.index))
        if t.dtype != declared.properties.dtype or t.numel() != declared.chunk.sizes.numel():
            raise RuntimeError(f"{item.index.fqn} at {list(item.index.offset)}: source gave {t.dtype} "
                               f"{list(t.shape)}, planned {declared.properties.dtype} {list(declared.chunk.sizes)}")
        return _own_storage(t.reshape(declared.chunk.sizes))

    def write(self) -> None:
        """Write every planned item into one ``.distcp`` file, one tensor in memory at a time."""
        extra = {}
        if "serialization_format" in inspect.signature(_write_item).parameters:
            from torch.distributed.checkpoint.filesystem import SerializationFormat

            extra["serialization_format"] = SerializationFormat.TORCH_SAVE  # as Megatron writes
        transforms = [self.transforms] if hasattr(self, "transforms") else []
        with open(os.path.join(self.checkpoint_dir, self.file_name), "wb") as stream:
            for item in self.items:
                data = self._data(item)
                self.results.append(_write_item(*transforms, stream, data, item, self.file_name, **extra))
                del data
            os.fsync(stream.fileno())

    def retrieve_write_results(self) -> list[WriteResult]:
        return self.results


class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """``torch_dist`` v1 saving (see the module docstring) for state dicts of ``meta`` tensors."""

    def __init__(self, source: ChunkSource):
        super().__init__("torch_dist", 1, thread_count=1)
        self.source = source

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
        writer = StreamingWriter(checkpoint_dir, self.source)
        planner = MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                   flatten_state_dict=False)
        finalize_args = save_state_dict_async_plan(pyt_state_dict, writer, None, 0, planner=planner)[0]
        writer.write()
        save_state_dict_async_finalize(*finalize_args)

    def async_save(self, sharded_state_dict, checkpoint_dir: Path):
        raise NotImplementedError("StreamingSaveStrategy saves synchronously (its data is produced on demand)")

