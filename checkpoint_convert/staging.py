"""Errors and all-or-nothing output directories for the converters.

Every converter validates its inputs before writing anything, then writes into a hidden temporary
directory beside the destination and renames it into place only when everything succeeded. A
failure at any point removes the temporary directory, so a failed run leaves nothing behind
(and a pre-existing ``--force`` target is untouched until the final rename).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class ConvertError(ValueError):
    """A checkpoint that cannot be converted exactly; the message names the file/tensor/field."""


def check_out_dir(out_dir: str | Path, force: bool) -> Path:
    """``out_dir`` as a Path; error when it holds anything and ``force`` is off."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConvertError(f"output {out}: directory is not empty (pass --force to replace it)")
    return out


@contextlib.contextmanager
def staged_dir(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out_dir`` when the block exits cleanly.

    The temporary directory lives in ``out_dir``'s parent (same filesystem, so the final
    ``os.replace`` is atomic for an absent or empty target).
    """
    out = check_out_dir(out_dir, force).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
