"""Structural check of a GGUF file before anything dequantises it.

transformers' GGUF reader memory-maps the file and reshapes each tensor's bytes, so a file cut in
its header ends in a bare ``struct.error`` and one cut mid-tensor in "cannot reshape array".
:func:`check_gguf` walks the header itself (GGUF v2/v3: magic, version, key-value pairs, tensor
infos; see https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) over a memory map, checking
every length against the bytes left before reading it, then checks that every tensor's byte
range (its element count, type block size and offset) lies inside the file. Errors are one line:
``<file>: truncated GGUF header (...)`` or ``<file>: tensor <name>: ...``.
"""
from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

from checkpoint_convert.staging import ConvertError

MAGIC = b"GGUF"
# value type -> struct format of the scalar types (8: string, 9: array)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_DIMS = 8  # ggml tensors have at most 4


class _Cursor:
    """Reads little-endian fields from a memory map; a read past the end is a one-line error."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos, self.where = buf, path, 0, "the file start"

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ConvertError(f"{self.path}: truncated GGUF header (in {self.where}: {n} bytes needed at byte "
                               f"{self.pos}, the file has {len(self.buf)})")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", "replace")

    def value(self, vtype: int):
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if count > len(self.buf) - self.pos:  # every item takes at least one byte
                raise ConvertError(f"{self.path}: truncated GGUF header (in {self.where}: an array of {count} items "
                                   f"with {len(self.buf) - self.pos} bytes left)")
            for _ in range(count):
                self.value(itype)
            return None  # arrays (vocabulary, merges) are not needed here
        raise ConvertError(f"{self.path}: corrupt GGUF header (in {self.where}: unknown value type {vtype})")


def check_gguf(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Check ``path``'s header and tensor byte ranges against the file length; returns the
    tensor shapes by name. :class:`ConvertError` naming the file (and tensor) otherwise."""
    from gguf.constants import GGML_QUANT_SIZES

    path = Path(path)
    with open(path, "rb") as f:
        if path.stat().st_size == 0:
            raise ConvertError(f"{path}: empty file, not GGUF")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            c = _Cursor(buf, path)
            if c.take(4) != MAGIC:
                raise ConvertError(f"{path}: not a GGUF file (no GGUF magic)")
            version = c.unpack("<I")
            if version not in (2, 3):
                raise ConvertError(f"{path}: GGUF version {version} is not supported (2 or 3)")
            n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
            alignment = 32
            for i in range(n_kv):
                c.where = f"key-value pair {i} of {n_kv}"
                key = c.string()
                c.where = f"key-value pair {i} '{key[:80]}'"
                value = c.value(c.unpack("<I"))
                if key == "general.alignment":
                    alignment = value if isinstance(value, int) and value > 0 else 0
            if alignment <= 0 or alignment & (alignment - 1):
                raise ConvertError(f"{path}: corrupt GGUF header (general.alignment must be a power of two)")
            infos = []
            for i in range(n_tensors):
                c.where = f"tensor info {i} of {n_tensors}"
                name = c.string()
                c.where = f"tensor info {i} '{name[:80]}'"
                n_dims = c.unpack("<I")
                if n_dims > MAX_DIMS:
                    raise ConvertError(f"{path}: tensor {name}: {n_dims} dimensions (corrupt GGUF header)")
                dims = tuple(c.unpack("<Q") for _ in range(n_dims))
                infos.append((name, dims, c.unpack("<I"), c.unpack("<Q")))
            start = -(-c.pos // alignment) * alignment
            _check_ranges(path, infos, start, len(buf), GGML_QUANT_SIZES)
    return {name: dims for name, dims, _, _ in infos}


def _check_ranges(path: Path, infos: list, start: int, size: int, quant_sizes: dict) -> None:
    """Every tensor's bytes (from its type's block size) inside the file, without overlaps."""
    ranges = []
    for name, dims, ggml_type, offset in infos:
        if ggml_type not in quant_sizes:
            raise ConvertError(f"{path}: tensor {name}: unknown ggml type {ggml_type}")
        block, type_bytes = quant_sizes[ggml_type]
        numel = math.prod(dims)
        if numel % block:
            raise ConvertError(f"{path}: tensor {name}: {numel} elements is not a multiple of its type's block of "
                               f"{block}")
        begin, end = start + offset, start + offset + numel // block * type_bytes
        if end > size:
            raise ConvertError(f"{path}: tensor {name}: bytes {begin}..{end} lie past the end of the file "
                               f"({size} bytes): the file is truncated")
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, first), (begin, _, name) in zip(ranges, ranges[1:]):
        if begin < end:
            raise ConvertError(f"{path}: tensor {name} overlaps tensor {first} (corrupt GGUF header)")
