"""Hugging Face checkpoint directories: header-only inspection, one-shard-at-a-time reads, sharded writes.

Reading never loads more than one ``.safetensors`` file: :func:`open_hf` parses only the JSON
headers (names, dtypes, shapes, byte ranges) and checks every file's size against its header, so a
truncated download is reported before any conversion starts; then either whole files
(:meth:`HFCheckpoint.iter_files`) or just named tensors (:meth:`HFCheckpoint.read`) are read. Writing produces the layout
transformers and vLLM expect for sharded checkpoints: ``model-0000k-of-0000n.safetensors`` files
plus ``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``).
"""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoint_convert.staging import ConvertError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


@dataclass
class HFCheckpoint:
    """An HF model directory, inspected but not loaded: ``config`` is ``config.json``."""

    root: Path
    config: dict
    files: list[str]
    tensors: dict[str, TensorInfo]

    def iter_files(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """``(file name, its tensors)`` one file at a time, in file order."""
        for name in self.files:
            yield name, load_file(self.root / name)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Just the tensors ``names`` (copies; each file is opened only for the read)."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.tensors[n].file, []).append(n)
        out = {}
        for file, wanted in by_file.items():
            with safe_open(self.root / file, framework="pt") as f:
                out.update({n: f.get_tensor(n) for n in wanted})
        return out

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own bound
MAX_HEADER_DEPTH = 8  # a valid header nests 3 deep: {name: {"shape": [...]}}


def _parse_header(path: Path, raw: bytes) -> dict:
    """The JSON header as a dict, refusing deep nesting before ``json`` recurses into it."""
    depth = 0
    for ch in _brackets(raw):
        depth += 1 if ch in "[{" else -1
        if depth > MAX_HEADER_DEPTH:
            raise ConvertError(f"{path}: corrupt safetensors header (nested deeper than {MAX_HEADER_DEPTH})")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ConvertError(f"{path}: corrupt safetensors header ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header


def _brackets(raw: bytes) -> str:
    """The header's brackets outside JSON strings, in order (strings, escapes included, dropped)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", raw.decode("utf-8", "replace"))
    return re.sub(r"[^\[\]{}]", "", text)


def _tensor_entry(path: Path, name: str, v: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """dtype, shape and byte range of one header entry, each field checked."""
    ok = (isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)
          and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v["shape"])
          and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
          and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in v["data_offsets"]))
    if not ok:
        raise ConvertError(f"{path}: tensor {name}: corrupt header entry (want dtype, shape of sizes >= 0 and "
                           f"data_offsets [begin, end]), got {str(v)[:120]}")
    if v["dtype"] not in ST_DTYPES:
        raise ConvertError(f"{path}: tensor {name} has unsupported dtype {v['dtype']}")
    dtype, shape = ST_DTYPES[v["dtype"]], tuple(v["shape"])
    begin, end = v["data_offsets"]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ConvertError(f"{path}: tensor {name}: {v['dtype']} {list(shape)} needs "
                           f"{math.prod(shape) * dtype.itemsize} bytes, its data_offsets [{begin}, {end}] hold "
                           f"{end - begin}")
    return dtype, shape, begin, end


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor table of one safetensors file, parsed and checked by us before any tensor is read.

    :class:`ConvertError` (one line, naming the file and tensor) for a truncated file, a header
    over :data:`MAX_HEADER_BYTES` or nested deeper than :data:`MAX_HEADER_DEPTH`, an entry whose
    byte length disagrees with its dtype and shape, and byte ranges that overlap, leave gaps or
    run past the end of the file (the safetensors library would fail mid-read, or read another
    tensor's bytes).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConvertError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        n = struct.unpack("<Q", raw)[0]
        if n > MAX_HEADER_BYTES:
            raise ConvertError(f"{path}: safetensors header of {n} bytes is over the {MAX_HEADER_BYTES} byte bound")
        if 8 + n > size:
            raise ConvertError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        header = _parse_header(path, f.read(n))
    header.pop("__metadata__", None)
    entries = sorted((_tensor_entry(path, name, v)[2:], name, v) for name, v in header.items())
    at = 0
    for (begin, end), name, _ in entries:
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"leaves a gap of {begin - at} bytes before it"
            raise ConvertError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] {what} (corrupt header)")
        at = end
    if 8 + n + at != size:
        raise ConvertError(f"{path}: truncated safetensors file (header promises {8 + n + at} "
                           f"bytes, file has {size})")
    out = {}
    for name, v in header.items():
        dtype, shape, _, _ = _tensor_entry(path, name, v)
        out[name] = TensorInfo(path.name, dtype, shape)
    return out


def read_json(path: Path) -> dict:
    """A JSON object file (``config.json``, the shard index) or a one-line ConvertError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise ConvertError(f"{path}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _shard_files(root: Path) -> list[str]:
    if (root / INDEX).is_file():
        weight_map = read_json(root / INDEX).get("weight_map") or {}
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise ConvertError(f"{root / INDEX}: shard files {missing} do not exist")
        return files
    if (root / SINGLE).is_file():
        return [SINGLE]
    found = sorted(p.name for p in root.glob("*.safetensors"))
    if len(found) != 1:
        raise ConvertError(f"{root}: no {INDEX} or {SINGLE}"
                           + (f" (found {found} without an index)" if found else " and no .safetensors file"))
    return found


def open_hf(root: str | Path) -> HFCheckpoint:
    """Inspect an HF directory: config, shard files, every tensor's dtype and shape (no data read)."""
    root = Path(root)
    if not (root / "config.json").is_file():
        raise ConvertError(f"{root}: no config.json (not a Hugging Face model directory)")
    config = read_json(root / "config.json")
    files = _shard_files(root)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(root / f).items():
            if name in tensors:
                raise ConvertError(f"{root}: tensor {name} appears in both {tensors[name].file} and {f}")
            tensors[name] = info
    if (root / INDEX).is_file():
        weight_map = read_json(root / INDEX).get("weight_map") or {}
        wrong = sorted(n for n, f in weight_map.items() if n not in tensors or tensors[n].file != f)
        if wrong:
            raise ConvertError(f"{root / INDEX}: weight_map disagrees with the shard files for {wrong[:5]}")
    return HFCheckpoint(root, config, files, tensors)


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the non-weight top-level files (config, generation config, tokenizer) of ``src``."""
    from checkpoint_convert.staging import usual_permissions

    copied = []
    for p in sorted(Path(src).iterdir()):
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != INDEX:
            shutil.copy2(p, Path(dst) / p.name)
            usual_permissions(Path(dst) / p.name)  # the output's mode, not the source's
            copied.append(p.name)
    return copied


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most ``max_bytes`` (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_shard(out: Path, k: int, n: int, tensors: dict[str, torch.Tensor]) -> None:
    save_shard({name: t.contiguous() for name, t in tensors.items()}, out / shard_name(k, n))


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``save_file`` (which creates files 0600), then the umask's permissions like any other output."""
    from checkpoint_convert.staging import usual_permissions

    save_file(tensors, path, metadata={"format": "pt"})
    usual_permissions(path)


def write_index(out: Path, shards: list[list[str]], total_bytes: int) -> None:
    weight_map = {name: shard_name(k, len(shards)) for k, names in enumerate(shards) for name in names}
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


