"""Errors and all-or-nothing output directories for the converters.

Every converter validates its inputs before writing anything, then writes into a hidden temporary
directory beside the destination and renames it into place only when everything succeeded. A
failure at any point removes the temporary directory, so a failed run leaves nothing behind
(and a pre-existing ``--force`` target is untouched until the final rename).

Three more guarantees:

- an output that is an input, holds one or lies inside one is refused before anything happens
  (``--force`` on ``--out`` equal to ``--hf`` used to delete the input weights);
- a run killed before it could clean up (``kill -9``, a node crash) leaves its temporary directory
  behind under a name that records the owner (host, pid, process start time). The next run for
  the same target removes the leftovers whose owner provably died: same host, and that pid is gone
  or belongs to a process started at another time. If a kill landed between the two renames that
  replace an existing output, the previous output is renamed back first. Leftovers of other hosts
  or of older versions are reported, never removed;
- outputs get the permissions any new directory or file gets (``0777`` / ``0666`` minus the umask),
  not ``0700`` / ``0600`` (:func:`usual_permissions`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator, Mapping, Optional

log = logging.getLogger(__name__)


class ConvertError(ValueError):
    """A checkpoint that cannot be converted exactly; the message names the file/tensor/field."""


def check_separate(out_dir: str | Path, inputs: Mapping[str, str | Path | None]) -> None:
    """ConvertError when ``out_dir`` and an input (``{"--hf": path}``) are the same directory or
    one holds the other (symlinks resolved): replacing the output would delete the input."""
    out = Path(out_dir).resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        src = Path(path).resolve()
        if out == src:
            how = "is the input"
        elif out in src.parents:
            how = "holds the input"
        elif src in out.parents:
            how = "lies inside the input"
        else:
            continue
        raise ConvertError(f"output {out_dir} {how} {flag} {path} (resolved: {out} and {src}); writing it would "
                           f"delete or mix with the input: choose an --out outside {src}")


def _start_time(pid: int) -> Optional[int]:
    """Start time of process ``pid`` (clock ticks since boot, /proc/PID/stat field 22); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after "(comm)" start at field 3


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{_start_time(os.getpid()) or 0}"


def _leftover(out: Path, name: str) -> Optional[re.Match]:
    """Parse ``name`` as ``.OUT.tmp-HOST-PID-START-RANDOM`` (a staging directory) or
    ``.OUT.old-HOST-PID-START`` (an output being replaced); the fixed fields are at the end, so a
    host name with dashes parses too."""
    stem = rf"^\.{re.escape(out.name)}\.(?P<kind>tmp|old)-(?P<host>.+)-(?P<pid>\d+)-(?P<start>\d+)"
    return re.match(stem + r"-[0-9a-f]{8}$", name) if name.startswith(f".{out.name}.tmp-") \
        else re.match(stem + "$", name)


def _owner_dead(pid: int, start: int) -> bool:
    """``pid`` on this host is gone, or is another process (started at another time)."""
    if not Path("/proc/self/stat").is_file():  # no way to tell: never call it dead
        return False
    now = _start_time(pid)
    return now is None or (start != 0 and now != start)


def recover_stale(out_dir: str | Path) -> list[Path]:
    """Clean up after killed runs that targeted ``out_dir``; returns the leftovers removed.

    A dead owner's staging directory is removed; its ``.old-`` directory (the output being
    replaced) is renamed back to ``out_dir`` when ``out_dir`` is missing, else removed.
    """
    out = Path(out_dir).absolute()
    if not out.parent.is_dir():
        return []
    removed, kept = [], []
    for p in sorted(out.parent.iterdir()):
        if not p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")) or not p.is_dir():
            continue
        m = _leftover(out, p.name)
        if m is None or m["host"] != socket.gethostname():
            kept.append(p.name)  # another host's (maybe running) or an older version's: not provably stale
            continue
        if not _owner_dead(int(m["pid"]), int(m["start"])):
            continue  # a conversion in progress
        if m["kind"] == "old" and not out.exists():
            os.replace(p, out)  # killed between the two renames: the previous output comes back
            log.warning("restored %s from %s, left by a killed conversion", out, p.name)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if kept:
        log.warning("%s: kept leftovers of conversions on other hosts or by older versions (remove them by hand "
                    "if no conversion is writing %s): %s", out.parent, out.name, ", ".join(kept))
    return removed


def check_out_dir(out_dir: str | Path, force: bool, inputs: Optional[Mapping[str, str | Path | None]] = None) -> Path:
    """``out_dir`` as a Path, after :func:`recover_stale`; error when it is or overlaps an input
    (``inputs``, see :func:`check_separate`) or holds anything and ``force`` is off."""
    check_separate(out_dir, inputs or {})
    out = Path(out_dir)
    recover_stale(out)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConvertError(f"output {out}: directory is not empty (pass --force to replace it)")
    return out


def process_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # older kernels: set and restore (not thread-safe, hence the fallback only)
    os.umask(mask)
    return mask


def usual_permissions(path: str | Path) -> None:
    """Give a file the mode a plain ``open`` would (``0666`` minus the umask). Writers that create
    files 0600 (safetensors' ``save_file``, ``mkstemp``) would otherwise leave outputs that only
    their owner can read, e.g. not an evaluation server running as another user."""
    os.chmod(path, 0o666 & ~process_umask())


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named directory created with mode 0777 minus the umask (tempfile.mkdtemp
    always uses 0700, which the final output would keep)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def staged_dir(out_dir: str | Path, force: bool = False,
               inputs: Optional[Mapping[str, str | Path | None]] = None) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out_dir`` when the block exits cleanly.

    The temporary directory lives in ``out_dir``'s parent (same filesystem, so the final
    ``os.replace`` is atomic for an absent or empty target). ``inputs`` (``{"--hf": path}``) are
    the directories the block reads: an ``out_dir`` that is, holds or lies in one is refused.
    """
    out = check_out_dir(out_dir, force, inputs).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    owner = _owner_tag()
    tmp = _new_dir(out.parent, f".{out.name}.tmp-{owner}-")
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{owner}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
