"""The model/optimizer/schedule checkpoint part: one Megatron distributed checkpoint, reshardable.

Every rank takes part in ``megatron.core.dist_checkpointing.save`` of

- ``model``: the GPTModel's ``sharded_state_dict()`` (global tensors, whatever the TP/PP/EP layout);
- ``optimizer``: the Megatron optimizer's ``sharded_state_dict(model)``: fp32 master weights and the
  Adam moments as tensors shaped like the parameters they belong to (``optimizer.state.fp32_param.*``,
  ``optimizer.state.exp_avg.*``, ``optimizer.state.exp_avg_sq.*``), plus the param groups and the step.
  The distributed optimizer uses megatron-core's ``fully_reshardable`` format (:data:`SHARDING`):
  its flat per-DP-rank buffers are gathered on data-parallel rank 0 over gloo (the memory-efficient
  variant, which needs no CUDA) and written in parameter space. megatron-core 0.16.1's other
  formats do not fit: ``dp_reshardable`` reshards over DP only, and ``fully_sharded_model_space``
  writes ``flattened_range`` tensors that 0.16.1's ``ShardedTensor`` refuses;
- ``scheduler``: the LR schedule's state (a plain dict).

Any layout loads it: a run saved at TP=2 resumes at TP=1, at DP=1 (one rank) on two ranks, at PP=2
at PP=1, with the distributed optimizer or the plain one (saved and loaded with the same choice).
The torch_dist files are ``__<rank>_<n>.distcp`` (each rank writes the shards it owns), ``.metadata``
(the global index), ``common.pt`` (the non-tensor state, written by rank 0) and ``metadata.json``.

Guarantees kept from the per-rank part it replaces:

- weights that are not finite are never saved: every rank checks its shard, the ranks agree (an
  all-reduce), and all of them raise, naming the first bad tensor, before anything is written;
- a resume takes the optimizer's moments, its master weights and the schedule's step count from the
  checkpoint, and the hyper-parameters (learning rate, its schedule, weight decay, Adam betas and
  epsilon) from the current config: a changed ``optim.*`` applies from the resumed step on;
- exact on CPU: a save and load at the same layout restores every bit;
- each rank's manifest check (``files``) covers exactly the files it reads: the index, the common
  state and the ``.distcp`` files holding a chunk of a tensor it requests.

Reading: the trainer's checkpoints are the user's own, but they are read as carefully as
``skpo-convert`` reads someone else's (:mod:`checkpoint_convert.untrusted`): ``.metadata`` goes
through the allow-list unpickler (and its sha256 through the manifest) before dist_checkpointing
unpickles it, ``common.pt`` is loaded with ``weights_only=True`` first, and byte objects (Transformer
Engine's ``_extra_state``) are checked with ``weights_only=True`` before torch's planner loads them.
``trust=True`` skips these checks (not the manifest).

Memory: a save gathers the distributed optimizer's state of one TP x PP domain (12 bytes per
parameter of the domain) on its data-parallel rank 0, and a load has every rank read its domain's
whole state before keeping its DP slice (megatron-core's ``fully_reshardable`` design).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# megatron-core's optimizer sharded_state_dict(metadata=...): parameter-space state, gathered over gloo
SHARDING = {"distrib_optim_sharding_type": "fully_reshardable",
            "distrib_optim_fully_reshardable_mem_efficient": True,
            "chained_optim_avoid_prefix": True}  # MoE: dense and expert optimizers share one key space
FORMAT = 2  # 1: the per-rank torch.save part (rank_<r>.pt); 2: this one
_ALWAYS = ("metadata.json", "common.pt", ".metadata")


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _first_non_finite(gpt) -> Optional[str]:
    for name, param in gpt.named_parameters():
        if not bool(torch.isfinite(param).all()):
            return name
    return None


def check_finite(gpt) -> None:
    """ValueError on every rank if any rank's weights hold NaN or inf (collective when distributed),
    naming the tensor (and on other ranks, the rank that holds it)."""
    bad = _first_non_finite(gpt)
    if _world() > 1:
        names: list = [None] * _world()
        dist.all_gather_object(names, bad)
        found = [(r, n) for r, n in enumerate(names) if n is not None]
        if found and bad is None:
            bad = f"{found[0][1]} on rank {found[0][0]}"
    if bad is not None:
        raise ValueError(f"refusing to save non-finite weights: {bad} has NaN or inf values (the run diverged; "
                         "resume from an earlier checkpoint with a smaller optim.lr)")


def inner_optimizers(optimizer) -> list:
    """The Megatron optimizers of a (possibly chained: dense + expert) optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def ensure_optimizer_state(optimizer) -> None:
    """Give a never-stepped torch Adam its state (zero moments, step 0), exactly what its first step
    would create: megatron-core reads the step from the state to build a sharded state dict, and
    without Apex or Transformer Engine (the CPU path) it asserts that there is one."""
    for opt in inner_optimizers(optimizer):
        inner = opt.optimizer
        if not isinstance(inner, torch.optim.Adam) or len(inner.state):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {"step": torch.tensor(0.0),
                                  "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                  "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def untie_adam_steps(optimizer) -> None:
    """Give every parameter's torch Adam state its own ``step`` tensor. Without Apex or Transformer
    Engine, megatron-core 0.16.1's ``DistributedOptimizer.load_state_dict`` sets one tensor as the
    step of every parameter, and torch Adam increments each parameter's step in place: the first
    update after a resume would count the step once per parameter and use wrong bias corrections."""
    for opt in inner_optimizers(optimizer):
        seen: set[int] = set()
        for state in opt.optimizer.state.values():
            step = state.get("step")
            if torch.is_tensor(step):
                if id(step) in seen:
                    state["step"] = step.clone()
                seen.add(id(state["step"]))


def float16_sharded_state_dict(opt, model_sharded: dict, is_loading: bool = False) -> dict:
    """``Float16OptimizerWithFloat16Params.sharded_state_dict`` of megatron-core 0.16.1, with the
    optimizer's parameter ids mapped right when a group mixes 16-bit and fp32 parameters (the local
    layer spec keeps its norm weights fp32 in a bf16 model). 0.16.1 numbers only the 16-bit
    parameters, so every state entry after the first fp32 parameter points at the wrong tensor or at
    none ("Param id 10 does not match any model sharded param"), and it pairs the master weights with
    the group's first ids instead of their own. The master weights are stored per group index
    (``{group: [tensors]}``, not 0.16.1's list of lists): dist_checkpointing drops an empty group
    (a group of fp32 parameters only) from a list and then cannot merge the loaded groups back into
    the shorter list; :func:`optimizer_loaded` turns it back into the list ``load_state_dict`` reads.
    """
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map, make_sharded_optimizer_tensor, optim_state_to_sharding_state)

    if is_loading:
        opt.init_state_fn(opt.optimizer, opt.config)
    state = opt.state_dict()
    pairs = list(zip(opt.float16_groups, opt.fp32_from_float16_groups, strict=True))
    model_of = {id(main): model for g16, g32 in pairs for model, main in zip(g16, g32, strict=True)}
    # the inner optimizer's parameters (masters of 16-bit params, fp32 params themselves) in its own order
    in_order = [model_of.get(id(p), p) for g in opt.optimizer.param_groups for p in g["params"]]
    id_to_sharded = get_param_id_to_sharded_param_map(model_sharded, in_order)
    sharded_of = {id(in_order[i]): sh for i, sh in id_to_sharded.items()}
    state["fp32_from_fp16_params"] = {
        i: [make_sharded_optimizer_tensor(sharded_of[id(model)], main, prefix="optimizer.state.fp32_param")
            for model, main in zip(g16, g32)] for i, (g16, g32) in enumerate(pairs)}
    step = opt._extract_common_per_param_step(state["optimizer"])
    optim_state_to_sharding_state(state["optimizer"], id_to_sharded, exclude_keys="step")
    if step:
        state["optimizer"]["state"]["common_step"] = step
    return state


def fix_param_group_index_map(opt) -> None:
    """Point the distributed optimizer's ``model_param_group_index_map`` at each parameter's own main
    parameter. megatron-core 0.16.1 numbers a group's parameters in grad-buffer order (the 16-bit
    buffer's, then the fp32 buffer's) but builds the inner optimizer's group as [fp32 params, masters
    of 16-bit params]: in a group mixing both (the local layer spec keeps norm weights fp32 in a bf16
    model; Qwen2's no-weight-decay group also holds the 16-bit qkv biases), every checkpoint read and
    write of the moments and master weights goes to another parameter's ("size of tensor a (128)
    must match the size of tensor b (64)", or silently wrong where the sizes agree). Training does
    not use the map; only the checkpoint functions do."""
    fixed = {}
    for g, (fp32, f16) in enumerate(zip(opt.model_fp32_groups, opt.model_float16_groups, strict=True)):
        fixed.update({p: (g, j) for j, p in enumerate(fp32)})
        fixed.update({p: (g, len(fp32) + j) for j, p in enumerate(f16)})
    if fixed.keys() != opt.model_param_group_index_map.keys():
        raise RuntimeError("distributed optimizer: its parameter groups do not cover the parameters of its "
                           "grad buffers (megatron-core version mismatch?); cannot checkpoint it")
    opt.model_param_group_index_map = fixed


def optimizer_sharded_state_dict(optimizer, model_sharded: dict, is_loading: bool = False) -> Any:
    """The (chained) Megatron optimizer's sharded state dict in :data:`SHARDING`'s format, laid out as
    ``ChainedOptimizer.sharded_state_dict`` lays it out (one optimizer: its own; several: by index)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    opts = inner_optimizers(optimizer)
    if len(opts) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()
    for o in opts:
        if isinstance(o, DistributedOptimizer):
            fix_param_group_index_map(o)
    parts = [float16_sharded_state_dict(o, model_sharded, is_loading)
             if isinstance(o, Float16OptimizerWithFloat16Params)
             else o.sharded_state_dict(model_sharded, is_loading, metadata=SHARDING) for o in opts]
    return parts[0] if len(parts) == 1 else dict(enumerate(parts))


def optimizer_loaded(optimizer, state: Any) -> Any:
    """The loaded optimizer state as the (chained) optimizer's ``load_state_dict`` reads it (the
    per-group master weights of :func:`float16_sharded_state_dict` back into a list)."""
    opts = inner_optimizers(optimizer)
    for part in ([state] if len(opts) == 1 else [state[i] for i in range(len(opts))]):
        masters = part.get("fp32_from_fp16_params") if isinstance(part, dict) else None
        if isinstance(masters, dict):
            part["fp32_from_fp16_params"] = [masters[i] for i in range(len(masters))]
    return state


def _sharded_tensors(state: Any) -> list:
    """Every ShardedTensor / ShardedObject of a sharded state dict, factories built."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    out: list = []
    for v in nested_values(state):
        if isinstance(v, ShardedTensorFactory):
            out.extend(x for x in nested_values(v.build()) if isinstance(x, (ShardedTensor, ShardedObject)))
        elif isinstance(v, (ShardedTensor, ShardedObject)):
            out.append(v)
    return out


def chunk_files(metadata: Any, request: Any) -> set[str]:
    """Relative paths of the ``.distcp`` files holding a chunk that overlaps a tensor of ``request``
    (a sharded state dict), by the checkpoint's ``.metadata`` index; byte objects by their key."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    where: dict[str, list[tuple[tuple, str]]] = {}
    for index, info in (metadata.storage_data or {}).items():
        where.setdefault(index.fqn, []).append((tuple(index.offset or ()), str(info.relative_path)))
    sizes: dict[str, dict[tuple, tuple]] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            sizes[fqn] = {tuple(c.offsets): tuple(c.sizes) for c in md.chunks}
    files: set[str] = set()
    for sh in _sharded_tensors(request):
        if isinstance(sh, ShardedObject):
            files.update(path for _, path in where.get(sh.unique_key, ()))
            continue
        lo = tuple(sh.global_offset)
        hi = tuple(o + n for o, n in zip(lo, (1,) * sh.prepend_axis_num + tuple(sh.local_shape)))
        for offset, path in where.get(sh.key, ()):
            size = sizes.get(sh.key, {}).get(offset)
            if size is None or all(a < o + s and o < b for a, b, o, s in zip(lo, hi, offset, size)):
                files.add(path)
    return files


class ModelPart:
    """Model shard, optimizer (master weights, moments, step) and LR schedule, as one dist checkpoint.

    Args:
        policy: the :class:`~megatron_skpo.model.train_step.Policy` (model, optimizer, scheduler).
        rank: kept for the callers' symmetry with the other per-rank parts (the global rank).
        trust: skip the untrusted-metadata checks on load (the manifest is still checked).
    """

    collective = True

    def __init__(self, policy, rank: int = 0, trust: bool = False):
        self.policy, self.rank, self.trust = policy, rank, trust
        self._request: Optional[dict] = None  # the load request built by files(), used by load()

    def sharded_state_dict(self, is_loading: bool = False) -> dict:
        p = self.policy
        ensure_optimizer_state(p.optimizer)
        model = p.gpt.sharded_state_dict()
        return {"model": model, "optimizer": optimizer_sharded_state_dict(p.optimizer, model, is_loading),
                "scheduler": p.scheduler.state_dict(), "format": FORMAT}

    def nbytes(self) -> int:
        """About the bytes this rank's save writes: its parameters, the optimizer's moments and master
        weights (the free-space check before a save)."""
        from megatron_skpo.trainer.disk import tensor_bytes

        state = [self.policy.gpt.state_dict()]
        for opt in inner_optimizers(self.policy.optimizer):
            state.append(list(getattr(getattr(opt, "optimizer", None), "state", {}).values()))
            state.extend(v for k, v in vars(opt).items() if "fp32_from" in k and "groups" in k)
        return tensor_bytes(state)

    def save(self, directory: Path) -> None:
        check_finite(self.policy.gpt)  # before anything is written (and before megatron is imported)
        from megatron.core import dist_checkpointing

        from megatron_skpo.model import cpu_compat

        cpu_compat.apply()  # point 11: dist_checkpointing's save on a host without CUDA
        dist_checkpointing.save(self.sharded_state_dict(), str(directory))

    def _load_request(self) -> dict:
        if self._request is None:
            self._request = self.sharded_state_dict(is_loading=True)
        return self._request

    def files(self, directory: Path) -> list[Path]:
        """The files this rank reads: the index, the common state and the ``.distcp`` files that hold
        a chunk of a tensor this rank requests (by the index, read with the allow-list unpickler).
        When the index cannot be read, every file of the directory (the manifest check then names
        the damaged one)."""
        from checkpoint_convert.untrusted import load_dist_metadata

        directory = Path(directory)
        always = [directory / n for n in _ALWAYS]
        try:
            metadata = load_dist_metadata(directory, trust=self.trust)
            needed = chunk_files(metadata, self._load_request())
        except Exception as e:  # unreadable or refused index: verify everything, the load then fails named
            log.debug("checkpoint %s: cannot narrow the files to verify (%s); verifying all", directory, e)
            return always + sorted(p for p in directory.iterdir() if p.is_file() and p.name not in _ALWAYS)
        return always + sorted(directory / f for f in needed)

    def load(self, directory: Path) -> None:
        from megatron.core import dist_checkpointing

        from checkpoint_convert.untrusted import check_byte_objects, check_common, load_dist_metadata

        if (Path(directory) / "rank_00000.pt").is_file() and not (Path(directory) / "metadata.json").is_file():
            raise FileNotFoundError(f"{directory} holds a per-rank model checkpoint (rank_<r>.pt) of an earlier "
                                    "version; it cannot be read by this one (start a new run or use that version)")
        if not self.trust:
            metadata = load_dist_metadata(directory)
            check_common(directory)
            check_byte_objects(directory, metadata)
        request, self._request = self._load_request(), None
        state = dist_checkpointing.load(request, str(directory))
        if state.get("format") != FORMAT:
            raise ValueError(f"{directory}: model checkpoint format {state.get('format')!r}, expected {FORMAT}")
        p = self.policy
        p.gpt.load_state_dict(state["model"])
        groups = lambda: [g for o in inner_optimizers(p.optimizer) for g in o.optimizer.param_groups]  # noqa: E731
        fresh = [{k: v for k, v in g.items() if k not in ("params", "step")} for g in groups()]
        # load_state_dict replaces the group dicts with the saved ones
        p.optimizer.load_state_dict(optimizer_loaded(p.optimizer, state["optimizer"]))
        untie_adam_steps(p.optimizer)
        for group, mine in zip(groups(), fresh, strict=True):
            group.update(mine)  # the saved groups carry the old hyper-parameters: the current config's win
        # the current config's schedule values win; only the step count comes from the checkpoint
        p.scheduler.override_opt_param_scheduler, p.scheduler.use_checkpoint_opt_param_scheduler = True, False
        p.scheduler.load_state_dict(state["scheduler"])
        p.scheduler.step(increment=0)  # re-apply lr and weight decay at the restored step
