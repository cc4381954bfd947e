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


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor table of one safetensors file; :class:`ConvertError` if the file is truncated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConvertError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        n = struct.unpack("<Q", raw)[0]
        if 8 + n > size:
            raise ConvertError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ConvertError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end != size:
        raise ConvertError(f"{path}: truncated safetensors file (header promises {8 + n + end} "
                           f"bytes, file has {size})")
    out = {}
    for name, v in header.items():
        if v["dtype"] not in ST_DTYPES:
            raise ConvertError(f"{path}: tensor {name} has unsupported dtype {v['dtype']}")
        out[name] = TensorInfo(path.name, ST_DTYPES[v["dtype"]], tuple(int(d) for d in v["shape"]))
    return out


def _shard_files(root: Path) -> list[str]:
    if (root / INDEX).is_file():
        weight_map = json.loads((root / INDEX).read_text())["weight_map"]
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
    config = json.loads((root / "config.json").read_text())
    files = _shard_files(root)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(root / f).items():
            if name in tensors:
                raise ConvertError(f"{root}: tensor {name} appears in both {tensors[name].file} and {f}")
            tensors[name] = info
    if (root / INDEX).is_file():
        weight_map = json.loads((root / INDEX).read_text())["weight_map"]
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


