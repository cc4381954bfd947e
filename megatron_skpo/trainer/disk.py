"""Disk space around checkpoint saves and HF exports: a check before writing, and a named error after.

A save whose size is known (the state's tensors) checks the free space first and fails before it
writes anything; a write that still runs out of space (an estimate too low, another job filling the
disk) fails with the same message instead of a library's own words for a short write ("[enforce fail
at inline_container.cc:672] unexpected pos 704 vs 598" from torch's zip writer, "Worker failure" from
megatron's checkpoint writer).
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Iterable, Optional

MARGIN = 1.05  # file headers, the manifest, metadata: a few percent over the tensors' bytes
SLACK_BYTES = 1 << 20  # below this much free space after a failed write, the disk was full


class DiskFullError(OSError):
    """Not enough free space for a save; the message names the path and the bytes needed and free."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the filesystem of ``path`` or of its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def tensor_bytes(objs: Iterable) -> int:
    """Bytes of every distinct tensor storage reached through dicts, lists and tuples of ``objs``."""
    import torch

    seen, total, todo = set(), 0, list(objs)
    while todo:
        o = todo.pop()
        if isinstance(o, torch.Tensor):
            key = (o.device.type, o.untyped_storage().data_ptr()) if o.numel() else None
            if key is not None and key not in seen:
                seen.add(key)
                total += o.untyped_storage().nbytes()
        elif isinstance(o, dict):
            todo.extend(o.values())
        elif isinstance(o, (list, tuple)):
            todo.extend(o)
    return total


def message(what: str, path: Path, needed: Optional[int], free: int) -> str:
    need = f"needs about {human(needed)}" if needed else "needs more space"
    return f"{what}: disk full: {need} in {path}, {human(free)} free there"


def require_free(what: str, path: Path, needed: int) -> None:
    """Raise :class:`DiskFullError` when ``path``'s filesystem has less than ``needed`` bytes (with margin)."""
    free = free_bytes(path)
    if needed and free < needed * MARGIN:
        raise DiskFullError(message(what, path, int(needed * MARGIN), free) + "; nothing was written")


def is_disk_full(error: BaseException, path: Path, needed: Optional[int] = None) -> bool:
    """Whether ``error`` (a failed write under ``path``) was the disk filling up: ENOSPC anywhere in its
    chain, "No space left" in its text, or (the libraries that report a short write as something
    else) hardly any free space left now."""
    e: Optional[BaseException] = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    free = free_bytes(path)
    return free < SLACK_BYTES or (needed is not None and free < needed)


def explain(error: BaseException, what: str, path: Path, needed: Optional[int] = None) -> BaseException:
    """``error`` itself, or a :class:`DiskFullError` naming the cause when the disk filled up."""
    if isinstance(error, DiskFullError) or not is_disk_full(error, path, needed):
        return error
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    full = DiskFullError(f"{message(what, path, needed, free_bytes(path))} while writing ({type(error).__name__}: "
                         f"{detail})")
    full.__cause__ = error
    return full
