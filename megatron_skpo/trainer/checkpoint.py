"""Atomic, rotating training checkpoints made of named state parts.

Layout under the checkpoint root::

    latest                    # one line: the name of the newest complete checkpoint ("step_00000050")
    step_00000050/COMPLETE    # marker, written last inside the temporary directory (JSON: step, parts)
    step_00000050/<part files>
    .tmp-step_00000060/       # a save in progress; removed by the next save or resume

A save writes every part into ``.tmp-<name>`` beside the target, fsyncs the files, writes the marker,
renames the directory into place, and only then replaces ``latest`` (write-temp, fsync, ``os.replace``).
A kill at any point therefore leaves ``latest`` naming a complete checkpoint (or no ``latest`` before
the first save). Old checkpoints are renamed to ``.trash-*`` before deletion, so a directory either
has its marker or is not a checkpoint at all.

Parts (see :mod:`megatron_skpo.trainer.parts`) have ``save(dir)``/``load(dir)``; a part with
``collective = True`` (RNG states, Megatron ``dist_checkpointing``) is saved by every rank, other parts
by rank 0 only. Every rank loads every part.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol, runtime_checkable

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
LATEST = "latest"
_NAME = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or restored; the message names the directory or part."""


@runtime_checkable
class StatePart(Protocol):
    """One named piece of training state stored in its own files inside a checkpoint directory."""

    collective: bool

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk."""

    step: int
    path: Path


def checkpoint_name(step: int) -> str:
    if step < 0:
        raise CheckpointError(f"checkpoint step must be >= 0, got {step}")
    return f"step_{step:08d}"


def fsync_path(path: Path) -> None:
    """fsync a file or directory (directories make renames and new entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def _noop() -> None:
    pass


def default_barrier() -> Callable[[], None]:
    """``torch.distributed.barrier`` when a process group is up, else a no-op."""
    import torch.distributed as dist

    return dist.barrier if dist.is_available() and dist.is_initialized() else _noop


class CheckpointManager:
    """Save every ``save_interval`` steps into ``root``, keep the newest ``keep_last``, resume from ``latest``.

    Args:
        rank: this process's global rank; rank 0 creates, renames and prunes directories.
        barrier: collective barrier over all ranks (default: torch.distributed's, if initialised).
    """

    def __init__(self, root: str | Path, save_interval: int, keep_last: int, rank: int = 0,
                 barrier: Optional[Callable[[], None]] = None):
        if save_interval < 0 or keep_last < 1:
            raise CheckpointError(f"checkpoint: need save_interval >= 0 and keep_last >= 1, "
                                  f"got {save_interval} and {keep_last}")
        self.root, self.save_interval, self.keep_last, self.rank = Path(root), save_interval, keep_last, rank
        self.barrier = barrier if barrier is not None else default_barrier()

    def should_save(self, step: int, last_step: int) -> bool:
        """At every ``save_interval``-th step and always at the final step."""
        return step == last_step or (self.save_interval > 0 and step % self.save_interval == 0)

    # ----- discovery -------------------------------------------------------------------------
    def complete(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [Checkpoint(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := _NAME.match(p.name)) and is_complete(p)]
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> Optional[Checkpoint]:
        """The checkpoint ``latest`` names; if it is missing or partial, the newest complete one (warned)."""
        pointer = self.root / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            m = _NAME.match(name)
            if m and is_complete(self.root / name):
                return Checkpoint(int(m.group(1)), self.root / name)
            found = self.complete()
            log.warning("checkpoint: %s names %r, which is not a complete checkpoint; falling back to %s",
                        pointer, name, found[-1].path if found else "a fresh start")
            return found[-1] if found else None
        found = self.complete()
        if found:
            log.warning("checkpoint: no %s pointer in %s; using the newest complete checkpoint %s",
                        LATEST, self.root, found[-1].path)
            return found[-1]
        return None

    # ----- save ------------------------------------------------------------------------------
    def save(self, step: int, parts: Mapping[str, StatePart]) -> Path:
        """Write ``parts`` as the checkpoint of ``step`` (collective: every rank must call it)."""
        name = checkpoint_name(step)
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            tmp.mkdir()
        self.barrier()
        for part_name, part in parts.items():
            if self.rank == 0 or getattr(part, "collective", False):
                part_dir = tmp / part_name
                part_dir.mkdir(exist_ok=True)
                part.save(part_dir)
        self.barrier()
        if self.rank == 0:
            self._commit(step, tmp, final, list(parts))
        self.barrier()
        return final

    def _commit(self, step: int, tmp: Path, final: Path, part_names: list[str]) -> None:
        (tmp / MARKER).write_text(json.dumps({"step": step, "parts": part_names}) + "\n")
        fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after a fallback resume): move the old one aside first
            final.rename(self.root / f".trash-{final.name}")
        tmp.rename(final)
        fsync_path(self.root)
        atomic_write_text(self.root / LATEST, final.name + "\n")
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        for ck in self.complete()[: -self.keep_last]:
            if ck.path != keep:
                self._discard(ck.path)
        self._remove_stale()

    def _discard(self, path: Path) -> None:
        trash = self.root / f".trash-{path.name}"
        path.rename(trash)  # one atomic step: the checkpoint disappears whole
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Leftovers of killed saves and prunes, and step directories without a marker."""
        for p in self.root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif _NAME.match(p.name) and p.is_dir() and not is_complete(p):
                self._discard(p)

    # ----- restore ---------------------------------------------------------------------------
    def restore(self, parts: Mapping[str, StatePart], checkpoint: Optional[Checkpoint] = None
                ) -> Optional[Checkpoint]:
        """Load ``parts`` from ``checkpoint`` (default: :meth:`latest`); None when there is none."""
        ck = checkpoint if checkpoint is not None else self.latest()
        if ck is None:
            return None
        meta = json.loads((ck.path / MARKER).read_text())
        missing = [n for n in parts if n not in meta["parts"]]
        if missing:
            raise CheckpointError(f"checkpoint {ck.path}: has no part(s) {', '.join(missing)} "
                                  f"(it holds {', '.join(meta['parts'])})")
        for part_name, part in parts.items():
            try:
                part.load(ck.path / part_name)
            except (OSError, KeyError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"checkpoint {ck.path}: part {part_name!r} failed to load: {e}") from e
        return ck
