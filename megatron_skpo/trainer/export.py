"""Writing the trained policy as a Hugging Face checkpoint (``--export-hf`` / ``checkpoint.export_hf``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch


def export_hf(policy, hf_config: dict, source_dir: str, out_dir: str, rank: int, tp_group, pp_group,
              shard_bytes: int = 5 * 10**9, overwrite: bool = False) -> Optional[Path]:
    """Write the policy as an HF checkpoint (collective: every rank calls it).

    Tensors stream unit by unit through the rollout weight sync's ``megatron_to_hf_stream`` (TP
    gather, PP broadcast), so no rank ever holds the whole model; rank 0 writes shards of at most
    ``shard_bytes`` (one ``model.safetensors`` when it fits, else ``model-0000k-of-0000n`` plus the
    index) and the source's config/tokenizer files into a staged directory renamed at the end. Each
    shard's size is known before it is written: one that does not fit the free space, or a write
    that runs out of it, is a :class:`~megatron_skpo.trainer.disk.DiskFullError` naming the path and
    the bytes, and the staged directory is removed.
    """
    from checkpoint_convert.hf_io import copy_side_files, shard_name, write_index
    from checkpoint_convert.staging import staged_dir
    from megatron_skpo.rollout.weight_sync import megatron_to_hf_stream

    stream = megatron_to_hf_stream(policy.model, hf_config, tp_group=tp_group, pp_group=pp_group)
    if rank != 0:
        for _ in stream:  # take part in the collectives
            pass
        return None
    dtype = getattr(torch, str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"), torch.float32)
    with staged_dir(out_dir, force=overwrite, inputs={"model.hf_path": source_dir}) as tmp:
        shards, current, used, total = [], {}, 0, 0
        for name, t in stream:
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"refusing to export non-finite weights: {name} has NaN or inf values")
            t = t.to(dtype).contiguous()
            if current and used + t.nbytes > shard_bytes:
                _write_shard(current, used, tmp / f"part-{len(shards)}.safetensors", out_dir)
                shards, current, used = shards + [list(current)], {}, 0
            current[name], used, total = t, used + t.nbytes, total + t.nbytes
        _write_shard(current, used, tmp / f"part-{len(shards)}.safetensors", out_dir)
        shards.append(list(current))
        if len(shards) == 1:
            os.replace(tmp / "part-0.safetensors", tmp / "model.safetensors")
        else:
            for k in range(len(shards)):
                os.replace(tmp / f"part-{k}.safetensors", tmp / shard_name(k, len(shards)))
            write_index(tmp, shards, total)
        copy_side_files(source_dir, tmp)
    return Path(out_dir)


def _write_shard(tensors: dict, nbytes: int, path: Path, out_dir: str) -> None:
    """One safetensors shard of ``nbytes``: the free space checked first, a full disk named."""
    from checkpoint_convert.hf_io import save_shard
    from megatron_skpo.trainer import disk

    what = f"HF export {out_dir}"
    disk.require_free(what, path.parent, nbytes)
    try:
        save_shard(tensors, path)
    except Exception as e:
        raise disk.explain(e, what, path.parent, nbytes) from e
