"""Atomic, rotating training checkpoints made of named state parts.

Layout under the checkpoint root::

    latest                    # one line: the name of the newest complete checkpoint ("step_00000050")
    step_00000050/MANIFEST.json  # sha256 and size of every part file, written just before the marker
    step_00000050/COMPLETE    # marker, written last inside the temporary directory (JSON: step, parts,
                              # the manifest's own sha256)
    step_00000050/<part>/<files>
    .tmp-step_00000060/       # a save in progress; removed by the next save or resume

A save writes every part into ``.tmp-<name>`` beside the target, hashes every file into the
manifest, writes the marker, fsyncs the files, renames the directory into place, and only then
replaces ``latest`` (write-temp, fsync, ``os.replace``). A kill at any point therefore leaves ``latest``
naming a complete checkpoint (or no ``latest`` before the first save). Old checkpoints are renamed to
``.trash-*`` before deletion, so a directory either has its marker or is not a checkpoint at all.

A restore first checks the marker's record of the manifest, then the sha256 of every file it is about
to load (the files a part lists with ``files(dir)``, else every file in the part's directory), and
only then loads the parts: a flipped bit, a truncated or replaced file, a file added or removed after
the save is a :class:`CheckpointError` naming the file, never a silently different resume. Every
load error (unreadable marker, a part that fails to load) is a :class:`CheckpointError` naming the
checkpoint, the part and the file, and saying which earlier checkpoint a resume could use instead.

Parts (see :mod:`megatron_skpo.trainer.parts`) have ``save(dir)``/``load(dir)`` and optionally
``files(dir)`` (the files this rank reads); a part with ``collective = True`` (RNG states, Megatron
``dist_checkpointing``) is saved by every rank, other parts by rank 0 only. Every rank loads every part.
In a job of several ranks the ranks agree after the verification and after each part's load (an
all-gather of their errors): a file only one rank reads and finds corrupt stops every rank with that
rank's error, instead of leaving the others waiting in the next collective load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Protocol, runtime_checkable

from megatron_skpo.trainer import disk

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
LATEST = "latest"
HASH_CHUNK = 1 << 20  # files are hashed in 1 MiB reads: memory stays flat for any checkpoint size
_NAME = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or restored; the message names the directory or part."""


@runtime_checkable
class StatePart(Protocol):
    """One named piece of training state stored in its own files inside a checkpoint directory.

    A part may also define ``files(directory) -> Iterable[Path]``: the files *this rank* reads. A
    restore verifies those against the manifest; without it, every file of the part's directory
    (a collective part then has each rank hash every rank's files).
    """

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


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    # hashlib releases the GIL while it hashes a large chunk: a few threads hash many files in parallel.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(sha256_file, paths))


def write_manifest(directory: Path) -> str:
    """Write ``MANIFEST.json`` (sha256 and size of every file under ``directory`` but the manifest and
    the marker); returns the manifest's own sha256, which the marker records."""
    files = sorted(p for p in directory.rglob("*")
                   if p.is_file() and p.relative_to(directory).as_posix() not in (MANIFEST, MARKER))
    digests = _hash_all(files)
    entries = {p.relative_to(directory).as_posix(): {"sha256": d, "bytes": p.stat().st_size}
               for p, d in zip(files, digests)}
    text = json.dumps({"format": 1, "algorithm": "sha256", "files": entries}, indent=1, sort_keys=True) + "\n"
    (directory / MANIFEST).write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def _noop() -> None:
    pass


def default_barrier() -> Callable[[], None]:
    """``torch.distributed.barrier`` when a process group is up, else a no-op."""
    import torch.distributed as dist

    return dist.barrier if dist.is_available() and dist.is_initialized() else _noop


def default_gather() -> Optional[Callable[[object], list]]:
    """``torch.distributed.all_gather_object`` over the job when it has several ranks, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None

    def gather(obj: object) -> list:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    return gather


class CheckpointManager:
    """Save every ``save_interval`` steps into ``root``, keep the newest ``keep_last``, resume from ``latest``.

    Args:
        rank: this process's global rank; rank 0 creates, renames and prunes directories.
        barrier: collective barrier over all ranks (default: torch.distributed's, if initialised).
        gather: ``obj -> [obj of rank 0, obj of rank 1, ...]`` over all ranks, for the ranks to agree
            on restore errors (default: torch.distributed's with several ranks, else none).
    """

    def __init__(self, root: str | Path, save_interval: int, keep_last: int, rank: int = 0,
                 barrier: Optional[Callable[[], None]] = None,
                 gather: Optional[Callable[[object], list]] = None):
        if save_interval < 0 or keep_last < 1:
            raise CheckpointError(f"checkpoint: need save_interval >= 0 and keep_last >= 1, "
                                  f"got {save_interval} and {keep_last}")
        self.root, self.save_interval, self.keep_last, self.rank = Path(root), save_interval, keep_last, rank
        self.barrier = barrier if barrier is not None else default_barrier()
        self.gather = gather if gather is not None else default_gather()

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
        """Write ``parts`` as the checkpoint of ``step`` (collective: every rank must call it).

        A save that cannot fit (the parts' ``nbytes()`` against the free space) fails before writing;
        one that runs out of space while writing removes its partial files; both raise a
        :class:`CheckpointError` that says "disk full", with the path and the bytes needed and free.
        """
        name = checkpoint_name(step)
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        mine = {n: p for n, p in parts.items() if self.rank == 0 or getattr(p, "collective", False)}
        needed = sum(int(p.nbytes()) for p in mine.values() if hasattr(p, "nbytes"))
        if self.gather is not None:  # a shared checkpoint directory holds every rank's share
            needed = sum(self.gather(needed))
        self._agree(self._guard(lambda: disk.require_free(f"checkpoint {name}", self.root, needed), name))
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            tmp.mkdir()
        self.barrier()
        error = self._guard(lambda: self._save_parts(tmp, mine), name, tmp, needed)
        self._agree(error)
        self.barrier()
        if self.rank == 0:
            error = self._guard(lambda: self._commit(step, tmp, final, list(parts)), name, tmp, needed)
        self._agree(error)
        self.barrier()
        return final

    @staticmethod
    def _save_parts(tmp: Path, parts: Mapping[str, StatePart]) -> None:
        for part_name, part in parts.items():
            part_dir = tmp / part_name
            part_dir.mkdir(exist_ok=True)
            part.save(part_dir)

    def _guard(self, write: Callable[[], None], name: str, tmp: Optional[Path] = None,
               needed: Optional[int] = None) -> Optional[CheckpointError]:
        """Run ``write``; a full disk becomes a :class:`CheckpointError` naming it (partial files removed),
        other errors propagate."""
        try:
            write()
            return None
        except Exception as e:
            cause = disk.explain(e, f"checkpoint {name}", self.root, needed)
            if not isinstance(cause, disk.DiskFullError):
                raise
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            last = self.latest()
            error = CheckpointError(f"{cause}. No partial checkpoint is left; the last complete one is "
                                    f"{last.path if last else 'none (a resume starts afresh)'}")
            error.__cause__ = e
            return error

    def _commit(self, step: int, tmp: Path, final: Path, part_names: list[str]) -> None:
        manifest = write_manifest(tmp)
        (tmp / MARKER).write_text(json.dumps({"step": step, "parts": part_names, "manifest_sha256": manifest}) + "\n")
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
        """Load ``parts`` from ``checkpoint`` (default: :meth:`latest`); None when there is none.

        Every file a part is about to read is checked against the manifest first; any mismatch or
        load error is a :class:`CheckpointError` naming the checkpoint, the part and the file.
        """
        ck = checkpoint if checkpoint is not None else self.latest()
        if ck is None:
            return None
        error: Optional[CheckpointError] = None
        try:
            meta = self._read_marker(ck)
            parts = {n: p for n, p in parts.items() if n in meta["parts"] or not getattr(p, "optional", False)}
            missing = [n for n in parts if n not in meta["parts"]]
            if missing:
                raise CheckpointError(f"checkpoint {ck.path}: has no part(s) {', '.join(missing)} "
                                      f"(it holds {', '.join(meta['parts'])})")
            manifest = self._read_manifest(ck, meta)
            for part_name, part in parts.items():
                self._verify_part(ck, part_name, part, manifest)
        except CheckpointError as e:
            error = e
        self._agree(error)
        for part_name, part in parts.items():
            try:
                part.load(ck.path / part_name)
            except Exception as e:  # any failure, named: a raw UnpicklingError says nothing about where
                refused = _config_refusal(e)
                if refused is not None:  # the checkpoint is sound: the new config is what cannot resume it
                    error = CheckpointError(f"cannot resume from {ck.path}: {refused}")
                else:
                    error = CheckpointError(f"checkpoint {ck.path}: part {part_name!r} failed to load: "
                                            f"{type(e).__name__}: {e}{self._instead(ck)}")
                error.__cause__ = e
            self._agree(error)
        return ck

    def _agree(self, error: Optional[CheckpointError]) -> None:
        """Raise on every rank if any rank failed (collective when the job has several ranks)."""
        if self.gather is not None:
            failed = [(r, msg) for r, msg in enumerate(self.gather(None if error is None else str(error)))
                      if msg is not None]
            if failed and error is None:
                rank, msg = failed[0]
                raise CheckpointError(f"rank {rank} of the job: {msg}")
        if error is not None:
            raise error

    def _instead(self, ck: Checkpoint) -> str:
        """What to do about a damaged checkpoint: the resume that remains possible."""
        earlier = [c for c in self.complete() if c.step < ck.step]
        if earlier:
            return (f". The checkpoint is damaged: move {ck.path} out of {self.root} to resume from the previous "
                    f"one ({earlier[-1].path.name})")
        return f". The checkpoint is damaged and there is no earlier one in {self.root}"

    def _read_marker(self, ck: Checkpoint) -> dict:
        path = ck.path / MARKER
        try:
            meta = json.loads(path.read_text())
            if not isinstance(meta, dict) or not isinstance(meta.get("parts"), list):
                raise ValueError(f"expected an object with a 'parts' list, got {str(meta)[:80]!r}")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {ck.path}: unreadable {MARKER} marker {path}: {e}"
                                  f"{self._instead(ck)}") from None
        return meta

    def _read_manifest(self, ck: Checkpoint, meta: dict) -> dict:
        path = ck.path / MANIFEST
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ck.path}: no {MANIFEST}, so its files cannot be verified (it was "
                                  f"written before checkpoints carried checksums, or the manifest was deleted)"
                                  f"{self._instead(ck)}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("manifest_sha256"):
            raise CheckpointError(f"checkpoint {ck.path}: {path} does not match the sha256 the {MARKER} marker "
                                  f"recorded for it: the manifest is corrupt{self._instead(ck)}")
        try:
            return json.loads(data)["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ck.path}: corrupt {path}: {e}{self._instead(ck)}") from None

    def _verify_part(self, ck: Checkpoint, part_name: str, part: StatePart, manifest: dict) -> None:
        """sha256 of every file this rank will read for ``part_name`` against the manifest."""
        part_dir = ck.path / part_name
        files_of: Optional[Callable[[Path], Iterable[Path]]] = getattr(part, "files", None)
        if files_of is not None:
            files = sorted(Path(f) for f in files_of(part_dir))
        else:  # every file of the part: those on disk, and those the manifest promises
            on_disk = {p for p in part_dir.rglob("*") if p.is_file()} if part_dir.is_dir() else set()
            promised = {ck.path / rel for rel in manifest if rel.startswith(f"{part_name}/")}
            files = sorted(on_disk | promised)
        where = f"checkpoint {ck.path}: part {part_name!r}"
        present = [f for f in files if f.is_file()]
        for f, digest in zip(present, _hash_all(present)):
            rel = f.relative_to(ck.path).as_posix()
            entry = manifest.get(rel)
            if entry is None:
                raise CheckpointError(f"{where}: file {f} is not in {MANIFEST} (added after the checkpoint was "
                                      f"written){self._instead(ck)}")
            if digest != entry.get("sha256"):
                size = f.stat().st_size
                what = f"{size} bytes, {entry.get('bytes')} recorded" if size != entry.get("bytes") else "same size"
                raise CheckpointError(f"{where}: file {f} is corrupt: sha256 {digest[:16]}... differs from the "
                                      f"{str(entry.get('sha256'))[:16]}... recorded at save ({what})"
                                      f"{self._instead(ck)}")
        absent = [f for f in files if not f.is_file() and f.relative_to(ck.path).as_posix() in manifest]
        if absent:
            raise CheckpointError(f"{where}: file {absent[0]} is missing (the manifest lists it)"
                                  f"{self._instead(ck)}")


def _config_refusal(e: BaseException) -> Optional[BaseException]:
    """The :class:`~megatron_skpo.trainer.resume.ResumeConfigError` behind ``e``, if any."""
    from megatron_skpo.trainer.resume import ResumeConfigError

    while e is not None:
        if isinstance(e, ResumeConfigError):
            return e
        e = e.__cause__
    return None
