"""Megatron distributed checkpoints (``megatron.core.dist_checkpointing``) written and read from ONE process.

A distributed checkpoint stores *global* tensors cut into chunks; any TP/PP layout can load any
chunking (resharding is the loader's job). So the converter needs no process per rank: it asks a
real ``GPTModel`` -- built at TP=1/PP=1 on the ``meta`` device, so it costs no memory -- for its
``sharded_state_dict()``, which names every tensor exactly as Megatron does (layer-stacked keys
such as ``decoder.layers.self_attention.linear_qkv.weight [L, ...]``, the norm keys Transformer
Engine uses, the SwiGLU factory, the ``_extra_state`` objects), then fills in real data, cut into
the chunks the ``tp`` ranks of a TP-way job would write (the same global offsets and axis
fragmentations). The vocabulary is padded as Megatron pads it for that TP size.

Directory layout (Megatron-LM's, so ``--load DIR`` works there too):
  ``latest_checkpointed_iteration.txt`` ("release"), ``release/`` (the dist checkpoint; its
  ``common.pt`` holds ``checkpoint_version`` and ``iteration``, the model under key ``model``),
  ``skpo_convert.json`` (tp, pp, dtype, vocab sizes) and ``hf/`` (config.json,
  generation_config.json and tokenizer files: what is needed to rebuild the model and an HF copy).

Reading: the ``.metadata`` pickle of a checkpoint is checked against an allow-list before any
torch reader unpickles it (:mod:`.untrusted`), unless the caller trusts the checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

from megatron_skpo.model.mappings.sharding import parallel_kind
from checkpoint_convert.staging import ConvertError
from checkpoint_convert.untrusted import (
    UntrustedCheckpointError, check_common, load_dist_metadata, metadata_digest, metadata_path)

TRACKER, RELEASE, META, HF_SIDE = "latest_checkpointed_iteration.txt", "release", "skpo_convert.json", "hf"
FORMAT_VERSION = 1


def _cpu_dist_checkpointing() -> None:
    """On a host without CUDA, apply the model's CPU compatibility layer: dist_checkpointing's save
    path is one of its patch points (``cpu_compat`` point 11); a no-op on GPU machines."""
    from megatron_skpo.model import cpu_compat

    cpu_compat.apply()


def ensure_single_process_group() -> None:
    """A one-rank gloo group (dist_checkpointing needs one); refuse to run inside a bigger job."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConvertError("checkpoint conversion runs in one process; torch.distributed is "
                               f"initialised with world size {dist.get_world_size()}")
        _cpu_dist_checkpointing()
        return
    _cpu_dist_checkpointing()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


@dataclass
class Template:
    """Megatron's own names and shapes for a model: ``params`` are meta tensors (padded vocab)."""

    hf_config: dict
    padded_vocab: int
    params: dict[str, torch.Tensor]
    sharded: dict[str, object]


def template(hf_config: dict, padded_vocab: int) -> Template:
    """Build the TP=1/PP=1 ``GPTModel`` on the meta device and take its sharded state dict."""
    from megatron.core.models.gpt import GPTModel

    from megatron_skpo.model.builder import initialize_parallel, layer_spec, make_transformer_config
    from megatron_skpo.model.hf_config import gpt_model_kwargs

    ensure_single_process_group()
    initialize_parallel(1, 1)
    config = make_transformer_config(hf_config, dtype="fp32", impl="local", perform_initialization=False)
    # Not builder.build_gpt_model: it installs the HF rotary frequencies by a copy that the meta
    # device cannot do, and the template needs no rotary data anyway.
    with torch.device("meta"):
        model = GPTModel(config=config, transformer_layer_spec=layer_spec("local", config), pre_process=True,
                         post_process=True, parallel_output=True,
                         **{**gpt_model_kwargs(hf_config), "vocab_size": padded_vocab})
    params = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return Template(hf_config, padded_vocab, params, model.sharded_state_dict())


def _tp_chunks(st: ShardedTensor, kind: str, tp: int) -> list[ShardedTensor]:
    """Cut a TP=1 shard into the ``tp`` shards TP ranks hold (same global offsets as Megatron's)."""
    if kind == "replicated" or tp == 1:
        return [st]
    axis = 1 if kind == "row" else 0
    g = st.prepend_axis_num + axis
    size = st.local_shape[axis] // tp
    out = []
    for r in range(tp):
        data = st.data.narrow(axis, r * size, size).contiguous()
        offset = list(st.global_offset)
        offset[g] += r * size
        frags = list(st.axis_fragmentations)
        frags[g] *= tp
        out.append(dataclasses.replace(st, data=data, local_shape=tuple(data.shape),
                                       global_offset=tuple(offset), axis_fragmentations=tuple(frags)))
    return out


def shard_entry(entry: object, name: str, full: torch.Tensor, tp: int) -> list:
    """Megatron shards of one parameter from its full tensor (vocab already padded)."""
    kind = parallel_kind(name)
    if isinstance(entry, ShardedTensorFactory):
        built = dataclasses.replace(entry, data=full).build()
        built = built if isinstance(built, list) else [built]
    else:
        built = [dataclasses.replace(entry, data=full, dtype=full.dtype)]
    out = []
    for st in built:
        st = dataclasses.replace(st, dtype=full.dtype)
        out.extend(_tp_chunks(st, kind, tp))
    return out


def objects(tpl: Template) -> dict[str, ShardedObject]:
    """The ``_extra_state`` objects (``None`` for the local spec; Megatron expects them on load)."""
    return {k: v for k, v in tpl.sharded.items() if isinstance(v, ShardedObject)}


def save(out: Path, model_shards: dict[str, object], meta: dict, strategy: Optional[object] = None) -> None:
    """Write the dist checkpoint and the tracker/meta files into ``out`` (already a staging dir).

    ``strategy``: a ``dist_checkpointing`` save strategy (default: Megatron's ``torch_dist``).
    """
    state = {"model": model_shards, "checkpoint_version": 3.0, "iteration": 0}
    (out / RELEASE).mkdir()
    dist_checkpointing.save(state, str(out / RELEASE), sharded_strategy=strategy)
    (out / TRACKER).write_text(RELEASE)
    (out / META).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2) + "\n")


@dataclass
class McoreCheckpoint:
    root: Path
    ckpt_dir: Path
    hf_config: dict
    meta: dict
    shapes: dict[str, tuple[torch.Size, torch.dtype]]  # sharded key -> stored global shape, dtype
    metadata_sha256: Optional[str] = None  # .metadata as checked by open_mcore (None: trusted, unchecked)

    @property
    def padded_vocab(self) -> int:
        return int(self.shapes["embedding.word_embeddings.weight"][0][0])


def checkpoint_dir(root: Path) -> Path:
    """The dist checkpoint under ``root``: per the tracker file, or ``root`` itself."""
    if (root / "metadata.json").is_file():
        return root
    if not (root / TRACKER).is_file():
        raise ConvertError(f"{root}: neither a dist checkpoint (metadata.json) nor a Megatron "
                           f"checkpoint root ({TRACKER})")
    tag = (root / TRACKER).read_text().strip()
    sub = root / (RELEASE if tag == RELEASE else f"iter_{int(tag):07d}")
    if not (sub / "metadata.json").is_file():
        raise ConvertError(f"{root}: {TRACKER} points at {sub}, which holds no dist checkpoint")
    return sub


class _PreloadedMetadata(TorchDistLoadShardedStrategy):
    """Megatron's torch_dist load strategy, answering tensor-metadata queries from an already read
    (and checked) ``Metadata`` instead of unpickling ``.metadata`` again."""

    def __init__(self, metadata: object):
        super().__init__()
        self.metadata = metadata

    def load_tensors_metadata(self, checkpoint_dir: Path, metadata: object = None):
        return super().load_tensors_metadata(checkpoint_dir, metadata if metadata is not None else self.metadata)


def open_mcore(root: str | Path, like: str | Path | None = None, trust: bool = False) -> McoreCheckpoint:
    """Inspect a Megatron checkpoint: its HF config (``hf/`` or ``like``) and stored tensor shapes.

    The checkpoint's ``.metadata`` pickle is read with :func:`.untrusted.load_dist_metadata`'s
    allow-list unless ``trust`` (a crafted one would otherwise run code right here).
    """
    root = Path(root)
    ckpt = checkpoint_dir(root)
    cfg_dir = Path(like) if like else root / HF_SIDE
    if not (cfg_dir / "config.json").is_file():
        raise ConvertError(f"{cfg_dir}: no config.json (pass --like HF_DIR with the model's config)")
    meta = json.loads((root / META).read_text()) if (root / META).is_file() else {}
    ensure_single_process_group()
    digest = None if trust else metadata_digest(ckpt)
    metadata = load_dist_metadata(ckpt, trust=trust)
    if not trust:
        check_common(ckpt)  # read by every dist_checkpointing.load
    stored = dist_checkpointing.load_tensors_metadata(str(ckpt), sharded_strategy=_PreloadedMetadata(metadata))
    shapes = {k: (torch.Size(v.global_shape), v.dtype) for k, v in stored.items()}
    return McoreCheckpoint(root, ckpt, json.loads((cfg_dir / "config.json").read_text()), meta, shapes, digest)


def check_unchanged(ck: McoreCheckpoint) -> None:
    """UntrustedCheckpointError if ``.metadata`` changed since :func:`open_mcore` checked it: the
    torch reader that loads tensors unpickles it again."""
    if ck.metadata_sha256 is not None and metadata_digest(ck.ckpt_dir) != ck.metadata_sha256:
        raise UntrustedCheckpointError(f"{metadata_path(ck.ckpt_dir)}: changed after it was checked; "
                                       "refusing to load it")


def _built(entry: object) -> list[ShardedTensor]:
    """The TP=1 ShardedTensors of one template entry (a factory expands into its parts)."""
    if isinstance(entry, ShardedTensorFactory):
        built = entry.build()
        return built if isinstance(built, list) else [built]
    return [entry]


def _region_request(st: ShardedTensor, dtype: torch.dtype) -> ShardedTensor:
    """Ask for ``st``'s region as a plain (no prepended axis, no grid) tensor.

    A one-rank job must not describe the region on Megatron's regular fragment grid: the torch
    sharded-tensor metadata would then place every other fragment on "another" rank, which is
    itself, and reject the request. Without a grid, dist_checkpointing reads any sub-box.
    """
    shape = (1,) * st.prepend_axis_num + tuple(st.local_shape)
    return ShardedTensor(key=st.key, data=torch.empty(shape, dtype=dtype), dtype=dtype, local_shape=shape,
                         global_shape=tuple(st.global_shape), global_offset=tuple(st.global_offset),
                         axis_fragmentations=None, replica_id=0, prepend_axis_num=0,
                         allow_shape_mismatch=st.allow_shape_mismatch)


def load_params(ck: McoreCheckpoint, tpl: Template, names: list[str]) -> dict[str, torch.Tensor]:
    """Full (TP=1, padded-vocab) tensors of the parameters ``names`` (Megatron module names)."""
    request, regions = {}, []
    for name in names:
        entry = tpl.sharded[name]
        if entry.key not in ck.shapes:
            raise ConvertError(f"{ck.ckpt_dir}: no tensor '{entry.key}' (needed for {name})")
        dtype = ck.shapes[entry.key][1]
        for j, st in enumerate(_built(entry)):
            request[f"{name}#{j}"] = _region_request(st, dtype)
            regions.append((name, f"{name}#{j}", st))
    check_unchanged(ck)
    # One layer of the layer-stacked global tensors: the "every shard read exactly once" check
    # is for whole-model loads, so it is off here.
    loaded = dist_checkpointing.load({"model": request}, str(ck.ckpt_dir), validate_access_integrity=False)
    out: dict[str, torch.Tensor] = {}
    for name, rkey, st in regions:
        full = out.setdefault(name, torch.empty(tpl.params[name].shape, dtype=ck.shapes[st.key][1]))
        box = tuple(slice(o, o + n) for o, n in zip(st.global_offset[st.prepend_axis_num:], st.local_shape))
        full[box] = loaded["model"][rkey].reshape(st.local_shape)
    return out
