"""Reading Megatron/PyTorch distributed checkpoints that may come from someone else.

A ``torch_dist`` checkpoint directory holds three kinds of pickles:

- ``.metadata``: the global index (tensor shapes, dtypes, where every chunk lives). torch's
  ``FileSystemReader.read_metadata`` reads it with a plain ``pickle.load``, so a crafted file runs
  arbitrary code the moment anything opens the checkpoint. :func:`load_dist_metadata` reads it
  with an unpickler that resolves only the classes the format is made of (:data:`ALLOWED_GLOBALS`)
  and refuses anything else, naming the file and the class. It also refuses chunk files outside
  the checkpoint directory (``../``), which would copy another file's bytes into the weights;
- byte objects inside the ``.distcp`` files (Megatron's ``ShardedObject``, e.g. ``_extra_state``):
  torch's default load planner reads them with ``torch.load(weights_only=False)``.
  :func:`check_byte_objects` loads each one with ``weights_only=True`` first; a caller that loads
  whole models (``skpo-convert verify``) runs it, the converter never reads these objects;
- ``common.pt``: Megatron reads it with ``torch.load`` and its default ``weights_only=True``
  (torch >= 2.6); :func:`check_common` does the same explicitly first, so an environment that
  turns the default off (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) does not open it up, and the error
  names the file.

These checks read the files before torch does; they protect against a malicious checkpoint, not
against someone rewriting it while it is being loaded (:func:`metadata_digest` lets a caller
detect that between its own steps). ``trust=True`` (``--trust-checkpoint``) skips them for
checkpoints whose origin you trust and whose metadata uses classes this allow-list lacks.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Any

import torch

from checkpoint_convert.staging import ConvertError

METADATA_FILE = ".metadata"
TRUST_HINT = ("if you trust where this checkpoint comes from, pass --trust-checkpoint (skpo-convert) or "
              "trust=True to load it unchecked")
_DCP = "torch.distributed.checkpoint"
ALLOWED_GLOBALS = frozenset(
    {(f"{_DCP}.metadata", name) for name in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    | {(f"{_DCP}.planner", name) for name in (
        "SavePlan", "LoadPlan", "WriteItem", "ReadItem", "WriteItemType", "LoadItemType", "TensorWriteData",
        "BytesIOWriteData")}
    | {(f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
       ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")})
"""(module, name) pairs a ``.metadata`` pickle may refer to; torch dtypes (``torch.float32``) too."""


class UntrustedCheckpointError(ConvertError):
    """A checkpoint file that would run code or use classes outside the allow-list when loaded."""


def _weights_only_reason(error: Exception) -> str:
    """The line of torch's weights-only refusal that names what was refused (its first lines are
    generic advice to retry with weights_only=False)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(error).__name__])[0][:300]


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UntrustedCheckpointError(
            f"{self.path}: refusing to unpickle {module}.{name}: distributed-checkpoint metadata is made of "
            f"torch.distributed.checkpoint classes only, and this one could run code; {TRUST_HINT}")


def metadata_path(checkpoint_dir: str | Path) -> Path:
    """The ``.metadata`` file of a dist checkpoint directory (or the file itself)."""
    p = Path(checkpoint_dir)
    return p if p.name == METADATA_FILE else p / METADATA_FILE


def metadata_digest(checkpoint_dir: str | Path) -> str:
    """sha256 of the ``.metadata`` file (to detect a change after it was checked)."""
    return hashlib.sha256(metadata_path(checkpoint_dir).read_bytes()).hexdigest()


def load_dist_metadata(checkpoint_dir: str | Path, trust: bool = False) -> Any:
    """The ``torch.distributed.checkpoint.metadata.Metadata`` of a dist checkpoint directory.

    Unpickled with only :data:`ALLOWED_GLOBALS` (plus torch dtypes) resolvable: anything else is
    an :class:`UntrustedCheckpointError` naming the file and the class, raised before the object is
    created. ``trust=True`` reads it as torch does (plain ``pickle.load``).
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = metadata_path(checkpoint_dir)
    if not path.is_file():
        raise ConvertError(f"{path}: missing (not a torch_dist checkpoint directory)")
    with open(path, "rb") as f:
        try:
            metadata = pickle.load(f) if trust else _MetadataUnpickler(f, path).load()
        except UntrustedCheckpointError:
            raise
        except Exception as e:  # truncated or corrupt pickle, wrong arguments to an allowed class
            raise ConvertError(f"{path}: unreadable distributed-checkpoint metadata ({type(e).__name__}: {e})") \
                from None
    if not isinstance(metadata, Metadata):
        raise UntrustedCheckpointError(f"{path}: holds a {type(metadata).__name__}, not a checkpoint Metadata")
    if not trust:
        _check_storage_paths(path.parent, metadata, path)
    return metadata


def _check_storage_paths(root: Path, metadata: Any, path: Path) -> None:
    """Every chunk must live in a file inside the checkpoint directory: a ``../`` or absolute path
    would make the loader copy another file's bytes (a key, a password file) into the weights."""
    inside = root.resolve()
    for index, info in (metadata.storage_data or {}).items():
        rel = str(getattr(info, "relative_path", ""))
        if not rel or inside not in (inside / rel).resolve().parents:
            raise UntrustedCheckpointError(f"{path}: chunk {index.fqn!r} is stored in {rel!r}, outside the "
                                           "checkpoint directory")


def check_common(checkpoint_dir: str | Path) -> None:
    """Load ``common.pt`` (if present) with ``torch.load(weights_only=True)``;
    :class:`UntrustedCheckpointError` naming the file when it holds anything else."""
    path = Path(checkpoint_dir) / "common.pt"
    if not path.is_file():
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UntrustedCheckpointError(f"{path}: refused by torch.load(weights_only=True): "
                                       f"{_weights_only_reason(e)}; {TRUST_HINT}") from None


def check_byte_objects(checkpoint_dir: str | Path, metadata: Any) -> int:
    """Load every byte object of the checkpoint (Megatron ``ShardedObject``) with
    ``torch.load(weights_only=True)``; :class:`UntrustedCheckpointError` naming the object and file
    for one that would run code. Returns how many were checked. ``metadata`` must come from
    :func:`load_dist_metadata`, which checked that every file it names is inside the directory."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    root = Path(checkpoint_dir)
    keys = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    n = 0
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in keys:
            continue
        where = f"{root / info.relative_path} (object {index.fqn!r} at byte {info.offset})"
        if getattr(info, "transform_descriptors", None):
            raise UntrustedCheckpointError(f"{where}: stored with transforms {info.transform_descriptors}, which "
                                           f"this check cannot read; {TRUST_HINT}")
        with open(root / info.relative_path, "rb") as f:  # inside root: checked by load_dist_metadata
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:
            raise UntrustedCheckpointError(f"{where}: refused by torch.load(weights_only=True): "
                                           f"{_weights_only_reason(e)}; {TRUST_HINT}") from None
        n += 1
    return n
