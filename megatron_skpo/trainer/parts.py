"""Built-in checkpoint parts: state-dict objects, JSON state, RNG streams of every rank, loop progress.

Every file is read back with ``torch.load(weights_only=True)`` or ``json``: a checkpoint never
unpickles arbitrary objects. Every read error names the file (a bare ``UnpicklingError`` or
``JSONDecodeError`` does not say which of a checkpoint's files is bad). Each part lists the files it
reads (``files(dir)``), which the checkpoint manager verifies against the manifest before loading.
The model and optimizer parts come from Megatron's ``dist_checkpointing`` (a collective part with
``save(dir)``/``load(dir)``, added with the loop).
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing checkpoint file {path}")
    return path


def load_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``; a ValueError naming ``path`` when it cannot be read."""
    _require(path)
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # UnpicklingError, a truncated zip (RuntimeError), EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"checkpoint file {path}: unreadable ({type(e).__name__}: {first[:300]})") from e


def load_json_file(path: Path) -> Any:
    """JSON content of ``path``; a ValueError naming ``path`` when it is not valid JSON (or UTF-8)."""
    _require(path)
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"checkpoint file {path}: not valid JSON ({e})") from e


def _restore(obj: "Stateful", state: Any, path: Path) -> None:
    try:
        obj.load_state_dict(state)
    except Exception as e:
        raise ValueError(f"checkpoint file {path}: its state does not fit {type(obj).__name__} "
                         f"({type(e).__name__}: {e})") from e


class StateDictPart:
    """Stores ``obj.state_dict()`` in ``state.pt`` (tensors, lists, dicts, numbers and strings only).

    Used for the data sampler (``EpochSampler``), the SPO value tracker and the SKPO length tracker.
    """

    collective = False

    def __init__(self, obj: Stateful):
        self.obj = obj

    def save(self, directory: Path) -> None:
        torch.save(self.obj.state_dict(), directory / "state.pt")

    def files(self, directory: Path) -> list[Path]:
        return [directory / "state.pt"]

    def load(self, directory: Path) -> None:
        path = directory / "state.pt"
        _restore(self.obj, load_torch_file(path), path)


class RankStateDictPart:
    """Stores ``obj.state_dict()`` of every rank in ``rank_<r>.pt`` (collective): state that differs
    between data-parallel ranks, such as the drift store's responses of the prompts this rank trained."""

    collective = True

    def __init__(self, obj: Stateful, rank: int):
        self.obj, self.rank = obj, rank

    def _file(self, directory: Path) -> Path:
        return directory / f"rank_{self.rank:05d}.pt"

    def save(self, directory: Path) -> None:
        torch.save(self.obj.state_dict(), self._file(directory))

    def files(self, directory: Path) -> list[Path]:
        return [self._file(directory)]

    def load(self, directory: Path) -> None:
        path = self._file(directory)
        _restore(self.obj, load_torch_file(path), path)


class JsonPart:
    """Stores ``obj.state_dict()`` (JSON-serialisable) in ``state.json``: small, human-readable state."""

    collective = False

    def __init__(self, obj: Stateful):
        self.obj = obj

    def save(self, directory: Path) -> None:
        (directory / "state.json").write_text(json.dumps(self.obj.state_dict(), indent=1, sort_keys=True) + "\n")

    def files(self, directory: Path) -> list[Path]:
        return [directory / "state.json"]

    def load(self, directory: Path) -> None:
        path = directory / "state.json"
        _restore(self.obj, load_json_file(path), path)


@dataclass
class TrainProgress:
    """The loop's counters: the last finished step and the metrics history cursor.

    ``metrics_step`` is the last step whose metrics were written; on resume the JSONL sink drops
    lines after it so the resumed file equals an uninterrupted run's. ``update_kl`` is the token-mean
    k3 KL(old || updated) of the last step's updates (the tracker drift of ``algo.tracker.drift:
    batch_kl``).
    """

    step: int = 0
    metrics_step: int = 0
    consumed_prompts: int = 0
    sampled_tokens: int = 0  # every token the rollouts generated (train.max_sampled_tokens)
    update_kl: float = 0.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key in ("step", "metrics_step", "consumed_prompts", "sampled_tokens"):
            if not isinstance(state.get(key), int):
                raise ValueError(f"progress state: {key!r} must be an integer, got {state.get(key)!r}")
        if not isinstance(state.get("update_kl", 0.0), (int, float)):
            raise ValueError(f"progress state: 'update_kl' must be a number, got {state.get('update_kl')!r}")
        self.step, self.metrics_step = state["step"], state["metrics_step"]
        self.consumed_prompts, self.update_kl = state["consumed_prompts"], float(state.get("update_kl", 0.0))
        self.sampled_tokens = state["sampled_tokens"]


def get_rng_state(tracker: Optional[Any] = None) -> dict:
    """Python ``random``, NumPy's global generator, torch CPU, torch CUDA (if available) and a
    Megatron-style RNG tracker (``get_states()``), as a weights_only-loadable dict."""
    np_state = np.random.get_state(legacy=False)
    state: dict = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    if tracker is not None:
        state["tracker"] = dict(tracker.get_states())
    return state


def set_rng_state(state: dict, tracker: Optional[Any] = None) -> None:
    """Inverse of :func:`get_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": np_state["bit_generator"],
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state:
        if not torch.cuda.is_available():
            raise ValueError("rng state: saved with CUDA generators but CUDA is not available")
        if len(state["torch_cuda"]) != torch.cuda.device_count():
            raise ValueError(f"rng state: saved {len(state['torch_cuda'])} CUDA generators, "
                             f"this process sees {torch.cuda.device_count()} devices")
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if tracker is not None:
        if "tracker" not in state:
            raise ValueError("rng state: saved without the RNG tracker this run uses")
        tracker.set_states(state["tracker"])


class RNGPart:
    """The RNG streams of one rank in ``rank_<r>.pt`` (collective: every rank writes its own file).

    Args:
        tracker: optional Megatron ``CudaRNGStatesTracker``-like object (``get_states``/``set_states``),
            e.g. the model-parallel dropout streams.
    """

    collective = True

    def __init__(self, rank: int = 0, tracker: Optional[Any] = None):
        self.rank, self.tracker = rank, tracker

    def _file(self, directory: Path) -> Path:
        return directory / f"rank_{self.rank:05d}.pt"

    def save(self, directory: Path) -> None:
        torch.save(get_rng_state(self.tracker), self._file(directory))

    def files(self, directory: Path) -> list[Path]:
        return [self._file(directory)]  # this rank's only: each rank verifies what it reads

    def load(self, directory: Path) -> None:
        path = self._file(directory)
        if not path.is_file():
            ranks = sorted(p.name for p in directory.glob("rank_*.pt"))
            raise FileNotFoundError(f"missing checkpoint file {path} (saved ranks: {', '.join(ranks) or 'none'}; "
                                    f"resume with the same world size)")
        state = load_torch_file(path)
        try:
            set_rng_state(state, self.tracker)
        except Exception as e:
            raise ValueError(f"checkpoint file {path}: not a usable RNG state ({type(e).__name__}: {e})") from e


def training_parts(rank: int, progress: TrainProgress, sampler: Optional[Stateful] = None,
                   value_tracker: Optional[Stateful] = None, guard: Optional[Stateful] = None,
                   rng_tracker: Optional[Any] = None) -> dict[str, Any]:
    """The built-in parts under their checkpoint names; the run adds the model and the method's state."""
    parts: dict[str, Any] = {"progress": JsonPart(progress), "rng": RNGPart(rank, rng_tracker)}
    if guard is not None:
        parts["guard"] = JsonPart(guard)
    for name, obj in (("sampler", sampler), ("value_tracker", value_tracker)):
        if obj is not None:
            parts[name] = StateDictPart(obj)
    return parts
