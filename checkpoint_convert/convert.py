"""HF <-> Megatron conversion entry points: plain functions for the CLI, the weight sync and skpo-eval.

``hf_to_mcore`` is streaming: it plans the dist checkpoint from the HF headers alone (a state
dict of ``meta`` tensors, :mod:`.hf_source`) and saves it through ``dist_checkpointing.save`` with
a strategy that asks for each chunk's data only while writing it (:mod:`.stream_save`); the data
is converted one layer (a *unit*, see :mod:`.units`) at a time, reading only that layer's HF
tensors (peak: one unit's HF tensors, Megatron tensors and TP chunks).
``mcore_to_hf`` is fully streaming: it plans the output shards from the stored shapes, then loads
one layer at a time from the dist checkpoint and writes each shard as soon as it is complete
(peak: one output shard plus the layer in flight).

Both validate everything first (:mod:`.checks`; an output that is, holds or lies in an input is
refused before anything is read) and write through :func:`.staging.staged_dir`, so an error
leaves nothing behind.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from checkpoint_convert import checks, hf_io, mcore_io
from checkpoint_convert.hf_source import HFUnitSource
from checkpoint_convert.measure import Measure
from checkpoint_convert.sizes import parse_size
from checkpoint_convert.staging import ConvertError, check_out_dir, check_separate, staged_dir
from checkpoint_convert.stream_save import StreamingSaveStrategy
from megatron_skpo.model.mappings.common import EMBED, OUTPUT
from megatron_skpo.model.mappings.sharding import padded_vocab_size
from megatron_skpo.model.mappings.units import GLOBAL, hf_unit, mcore_unit, to_hf_unit


@dataclass
class ConvertReport:
    direction: str
    out: str
    seconds: float
    bytes: int
    peak_rss_mb: float
    peak_delta_mb: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / max(self.seconds, 1e-9)

    def as_dict(self) -> dict:
        return {**asdict(self), "gb_per_s": round(self.gb_per_s, 4)}


def _report(direction: str, out: Path, m: Measure, nbytes: int) -> ConvertReport:
    return ConvertReport(direction, str(out), round(m.seconds, 4), nbytes,
                         round(Measure.lifetime_peak_mb(), 1), round(m.peak_delta_mb, 1))


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1,
                dtype: str = "auto", force: bool = False, vocab_divisible_by: int = 128,
                ep: int = 1) -> ConvertReport:
    """Write a Megatron dist checkpoint of the HF model in ``hf_dir`` laid out for TP=``tp``.

    PP and EP (``pp``, ``ep``) are checked and recorded: a dist checkpoint stores global tensors
    (each routed expert is its own chunk), so any pipeline or expert-parallel layout loads it.

    Args:
        dtype: ``auto`` keeps each tensor's stored dtype; ``bf16``/``fp16``/``fp32`` cast.
        vocab_divisible_by: Megatron's ``make_vocab_size_divisible_by`` (0: no padding).
    """
    if dtype != "auto" and dtype not in checks.DTYPES:
        raise ConvertError(f"--dtype: got {dtype!r}; allowed: auto, {', '.join(checks.DTYPES)}")
    inputs = {"--hf": hf_dir}
    check_separate(out_dir, inputs)
    src = hf_io.open_hf(hf_dir)
    cfg, mapping = src.config, checks.architecture(src.config)
    padded = padded_vocab_size(int(cfg["vocab_size"]), tp, vocab_divisible_by)
    checks.check_parallel(cfg, tp, pp, padded, ep)
    # sizes against the tensors before Megatron builds the template (10**9 layers: a MemoryError)
    checks.check_config_fits(cfg, {n: t.shape for n, t in src.tensors.items()}, str(src.root))
    tpl = mcore_io.template(cfg, padded)
    expected = checks.expected_hf(mapping, cfg, tpl.params)
    checks.check_hf_tensors({n: t.shape for n, t in src.tensors.items()}, expected, str(src.root))
    check_out_dir(out_dir, force, inputs)
    cast = None if dtype == "auto" else checks.DTYPES[dtype]
    with Measure() as m, staged_dir(out_dir, force, inputs) as tmp:
        source = HFUnitSource(src, mapping, tpl, expected, tp, cast)
        shards: dict[str, object] = {**mcore_io.objects(tpl), **source.meta_shards()}
        stored = sorted({str(st.dtype).removeprefix("torch.") for v in shards.values()
                         if isinstance(v, list) for st in v})
        meta = dict(tp=tp, pp=pp, ep=ep, dtype=stored, vocab_size=int(cfg["vocab_size"]), padded_vocab_size=padded,
                    model_type=cfg["model_type"], source=str(Path(hf_dir).absolute()))
        mcore_io.save(tmp, shards, meta, StreamingSaveStrategy(source))
        (tmp / mcore_io.HF_SIDE).mkdir()
        hf_io.copy_side_files(src.root, tmp / mcore_io.HF_SIDE)
    return _report("hf-to-mcore", Path(out_dir), m, src.total_bytes)


def _shard_bytes(max_shard_size: str) -> int:
    try:
        size = parse_size(max_shard_size)
    except ValueError as e:
        raise ConvertError(f"--max-shard-size: {e}") from None
    if size <= 0:
        raise ConvertError(f"--max-shard-size: got {max_shard_size!r}; it must be positive (e.g. 5GB)")
    return size


def _hf_plan(expected: dict[int, dict], ck: mcore_io.McoreCheckpoint, max_bytes: int) -> list[list[str]]:
    """Output shards over HF names in the usual order (layers, then embedding/norm/head)."""
    itemsize = ck.shapes["embedding.word_embeddings.weight"][1].itemsize
    order = [u for u in expected if u != GLOBAL] + [GLOBAL]
    sizes = [(n, t.numel() * itemsize) for u in order for n, t in expected[u].items()]
    return hf_io.plan_shards(sizes, max_bytes)


def _load_unit(ck, tpl, mapping, unit: int, cast: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    vocab = int(tpl.hf_config["vocab_size"])
    names = [n for n in tpl.params if mcore_unit(n) == unit]
    mc = mcore_io.load_params(ck, tpl, names)
    mc = {k: v[:vocab].clone() if k in (EMBED, OUTPUT) else v for k, v in mc.items()}
    hf = to_hf_unit(mapping, tpl.hf_config, unit, mc)
    return {k: v if cast is None else v.to(cast) for k, v in hf.items()}


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (q/k/v are views of one QKV): copy those."""
    seen, out = set(), {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen or not t.is_contiguous() else t
        seen.add(ptr)
    return out


def _write_side_files(ck: mcore_io.McoreCheckpoint, like: Optional[Path], out: Path, dtype: str) -> None:
    src = like if like else ck.root / mcore_io.HF_SIDE
    if src.is_dir():
        hf_io.copy_side_files(src, out)
    cfg = dict(ck.hf_config)
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if not (out / "generation_config.json").is_file():
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path, like: Optional[str | Path] = None,
                max_shard_size: str = "5GB", dtype: str = "auto", force: bool = False,
                trust_checkpoint: bool = False) -> ConvertReport:
    """Write sharded safetensors + index + config/generation/tokenizer files from a dist checkpoint.

    ``trust_checkpoint``: skip the allow-list check of the checkpoint's pickled metadata
    (:mod:`.untrusted`); only for checkpoints from a source you trust.
    """
    if dtype != "auto" and dtype not in checks.DTYPES:
        raise ConvertError(f"--dtype: got {dtype!r}; allowed: auto, {', '.join(checks.DTYPES)}")
    shard_bytes = _shard_bytes(max_shard_size)  # before the checkpoint is opened: bad input fails first
    inputs = {"--mcore": mcore_dir, "--like": like}
    check_separate(out_dir, inputs)
    ck = mcore_io.open_mcore(mcore_dir, like, trust=trust_checkpoint)
    cfg, mapping = ck.hf_config, checks.architecture(ck.hf_config)
    tpl = mcore_io.template(cfg, ck.padded_vocab)
    checks.check_mcore_keys(ck.shapes, tpl.sharded, str(ck.ckpt_dir))
    expected = checks.expected_hf(mapping, cfg, tpl.params)
    plan = _hf_plan(expected, ck, shard_bytes)
    check_out_dir(out_dir, force, inputs)
    cast = None if dtype == "auto" else checks.DTYPES[dtype]
    with Measure() as m, staged_dir(out_dir, force, inputs) as tmp:
        pending: dict[int, dict] = {}
        total, written_dtype = 0, None
        for k, names in enumerate(plan):
            shard = {}
            for name in names:
                u = hf_unit(name)
                if u not in pending:
                    pending[u] = _load_unit(ck, tpl, mapping, u, cast)
                shard[name] = pending[u].pop(name)
                if not pending[u]:
                    del pending[u]
            hf_io.write_shard(tmp, k, len(plan), _unshare(shard))
            total += sum(t.numel() * t.element_size() for t in shard.values())
            written_dtype = written_dtype or str(next(iter(shard.values())).dtype).removeprefix("torch.")
            del shard
        hf_io.write_index(tmp, plan, total)
        _write_side_files(ck, Path(like) if like else None, tmp, written_dtype)
    return _report("mcore-to-hf", Path(out_dir), m, total)
