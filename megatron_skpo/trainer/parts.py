"""Built-in checkpoint parts: state-dict objects, JSON state, RNG streams of every rank, loop progress.

Every file is read back with ``torch.load(weights_only=True)`` or ``json``: a checkpoint never
unpickles arbitrary objects. Every read error names the file (a bare ``UnpicklingError`` or
``JSONDecodeError`` does not say which of a checkpoint's files is bad). Each part lists the files it
reads (``files(dir)``), which the checkpoint manager verifies against the manifest before loading.
The model and optimizer part is :mod:`megatron_skpo.trainer.model_state` (Megatron's
``dist_checkpointing``: any layout loads it).

Per-rank state and a changed layout: the per-rank parts given a :class:`Layout` record it
(``layout.json``, written by rank 0) and compare it on load. When the world size or the TP/PP/EP
sizes differ, a rank's saved state belongs to no rank of the new job:

- :class:`RNGPart` reseeds this rank's streams deterministically from (``train.seed``, step, rank)
  (:func:`reseed_rng`) and warns: random streams cannot be resharded;
- :class:`RankStateDictPart` with a ``merge`` function loads every saved rank's state and merges it
  (the drift store: entries keyed by prompt, so every rank gets all of them).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)
LAYOUT_FILE = "layout.json"


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


@dataclass(frozen=True)
class Layout:
    """The job's shape as per-rank state depends on it: world size and the model-parallel sizes."""

    world: int
    tp: int = 1
    pp: int = 1
    ep: int = 1

    @classmethod
    def current(cls) -> "Layout":
        """From torch.distributed and Megatron's parallel state (both initialised)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        return cls(dist.get_world_size(), ps.get_tensor_model_parallel_world_size(),
                   ps.get_pipeline_model_parallel_world_size(), ps.get_expert_model_parallel_world_size())

    def __str__(self) -> str:
        return f"{self.world} rank(s) at tp={self.tp} pp={self.pp} ep={self.ep}"


def save_layout(directory: Path, layout: Optional[Layout], rank: int) -> None:
    if layout is not None and rank == 0:
        (directory / LAYOUT_FILE).write_text(json.dumps(asdict(layout), sort_keys=True) + "\n")


def saved_layout(directory: Path) -> Optional[Layout]:
    """The layout a per-rank part was saved at; None for a checkpoint without the record."""
    path = directory / LAYOUT_FILE
    if not path.is_file():
        return None
    state = load_json_file(path)
    try:
        return Layout(**{k: int(state[k]) for k in ("world", "tp", "pp", "ep")})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"checkpoint file {path}: not a layout record ({type(e).__name__}: {e})") from e


class _PerRank:
    """A collective part with one ``rank_<r>.pt`` per rank and, given ``layout``, its layout record."""

    collective = True
    rank: int
    layout: Optional[Layout]

    def _file(self, directory: Path, rank: Optional[int] = None) -> Path:
        return directory / f"rank_{self.rank if rank is None else rank:05d}.pt"

    def _saved(self, directory: Path) -> Optional[Layout]:
        """The saved layout when it differs from this job's (None: same, or not recorded)."""
        if self.layout is None:
            return None
        saved = saved_layout(directory)
        return saved if saved is not None and saved != self.layout else None

    def _files(self, directory: Path, every_rank: bool) -> list[Path]:
        """This rank's file at an unchanged layout; at a changed one, every saved rank's file
        (``every_rank``) or none. The layout record itself is read (and verified) either way."""
        if self.layout is None:
            return [self._file(directory)]
        try:
            saved = self._saved(directory)
        except ValueError:  # unreadable record: verify it (and this rank's file); the load names it
            return [directory / LAYOUT_FILE, self._file(directory)]
        if saved is None:
            return [directory / LAYOUT_FILE, self._file(directory)]
        others = [self._file(directory, r) for r in range(saved.world)] if every_rank else []
        return [directory / LAYOUT_FILE] + others


class StateDictPart:
    """Stores ``obj.state_dict()`` in ``state.pt`` (tensors, lists, dicts, numbers and strings only).

    Used for the data sampler (``EpochSampler``), the SPO value tracker and the SKPO length tracker.
    """

    collective = False

    def __init__(self, obj: Stateful, optional: bool = False):
        self.obj, self.optional = obj, optional  # optional: a checkpoint without it loads (state as built)

    def save(self, directory: Path) -> None:
        torch.save(self.obj.state_dict(), directory / "state.pt")

    def files(self, directory: Path) -> list[Path]:
        return [directory / "state.pt"]

    def load(self, directory: Path) -> None:
        path = directory / "state.pt"
        _restore(self.obj, load_torch_file(path), path)


class RankStateDictPart(_PerRank):
    """Stores ``obj.state_dict()`` of every rank in ``rank_<r>.pt`` (collective): state that differs
    between data-parallel ranks, such as the drift store's responses of the prompts this rank trained.

    Args:
        layout: this job's layout, recorded at save and compared at load (None: not recorded; a
            resume must then have the same ranks).
        merge: ``[state of rank 0, state of rank 1, ...] -> state``; at a changed layout every rank
            loads every saved rank's state merged by it. Without it a changed layout is an error.
    """

    def __init__(self, obj: Stateful, rank: int, layout: Optional[Layout] = None,
                 merge: Optional[Callable[[list], Any]] = None):
        self.obj, self.rank, self.layout, self.merge = obj, rank, layout, merge

    def save(self, directory: Path) -> None:
        torch.save(self.obj.state_dict(), self._file(directory))
        save_layout(directory, self.layout, self.rank)

    def files(self, directory: Path) -> list[Path]:
        return self._files(directory, every_rank=True)

    def load(self, directory: Path) -> None:
        saved = self._saved(directory)
        if saved is None:
            path = self._file(directory)
            _restore(self.obj, load_torch_file(path), path)
            return
        if self.merge is None:
            raise ValueError(f"{directory}: saved by {saved}, this job is {self.layout}; this per-rank state "
                             "cannot be resharded (resume with the saved layout)")
        paths = [self._file(directory, r) for r in range(saved.world)]
        states = [load_torch_file(p) for p in paths]
        try:
            merged = self.merge(states)
        except Exception as e:
            raise ValueError(f"{directory}: the states of ranks 0..{saved.world - 1} do not merge "
                             f"({type(e).__name__}: {e})") from e
        _restore(self.obj, merged, directory / "rank_*.pt")
        log.info("checkpoint %s: saved by %s, this job is %s; rank %d loaded every saved rank's state",
                 directory, saved, self.layout, self.rank)


class JsonPart:
    """Stores ``obj.state_dict()`` (JSON-serialisable) in ``state.json``: small, human-readable state."""

    collective = False

    def __init__(self, obj: Stateful, optional: bool = False):
        self.obj, self.optional = obj, optional  # optional: a checkpoint without it loads (state as built)

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


def derived_seed(*values: int) -> int:
    """A 63-bit seed from integers (sha256: unrelated streams for neighbouring inputs)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, values)).encode()).digest()[:8], "little") >> 1


def reseed_rng(seed: int, step: int, rank: int, megatron: bool = False) -> None:
    """Seed this rank's streams from (``seed``, ``step``, ``rank``) when the saved ones cannot be used.

    Python's ``random`` and NumPy's global generator get a seed of (seed, step, global rank). torch's
    generator gets one of (seed, step), the same on every rank, as a fresh start gives it one seed
    everywhere; with ``megatron`` it is set through ``model_parallel_cuda_manual_seed``, which also
    seeds the model-parallel tracker's streams per tensor/expert-parallel rank (Megatron's offsets).
    """
    own, shared = derived_seed(seed, step, rank), derived_seed(seed, step) % (1 << 62)
    random.seed(own)
    np.random.seed(own % (1 << 32))
    torch.manual_seed(shared)
    if megatron:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(shared)


class RNGPart(_PerRank):
    """The RNG streams of one rank in ``rank_<r>.pt`` (collective: every rank writes its own file).

    Args:
        tracker: optional Megatron ``CudaRNGStatesTracker``-like object (``get_states``/``set_states``),
            e.g. the model-parallel dropout streams.
        layout: this job's layout, recorded at save and compared at load (None: not recorded; a
            resume must then have the same ranks).
        reseed: called instead of restoring when the layout changed (the streams of another layout
            belong to no rank of this one), e.g. ``lambda: reseed_rng(seed, progress.step, rank)``.
    """

    def __init__(self, rank: int = 0, tracker: Optional[Any] = None, layout: Optional[Layout] = None,
                 reseed: Optional[Callable[[], None]] = None):
        self.rank, self.tracker, self.layout, self.reseed = rank, tracker, layout, reseed

    def save(self, directory: Path) -> None:
        torch.save(get_rng_state(self.tracker), self._file(directory))
        save_layout(directory, self.layout, self.rank)

    def files(self, directory: Path) -> list[Path]:
        return self._files(directory, every_rank=False)  # this rank's only: each rank verifies what it reads

    def load(self, directory: Path) -> None:
        saved = self._saved(directory)
        if saved is not None:
            if self.reseed is None:
                raise ValueError(f"{directory}: RNG streams saved by {saved}, this job is {self.layout} "
                                 "(resume with the saved layout)")
            self.reseed()
            if self.rank == 0:
                log.warning("checkpoint: the RNG streams were saved by %s and this job is %s; random streams "
                            "cannot be resharded, so every rank reseeds them from (train.seed, step, rank): the "
                            "run continues deterministically, but not as the saved job would have", saved, self.layout)
            return
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
                   rng_tracker: Optional[Any] = None, layout: Optional[Layout] = None,
                   seed: int = 0) -> dict[str, Any]:
    """The built-in parts under their checkpoint names; the run adds the model and the method's state.

    With ``layout``, a resume at another layout reseeds the RNG streams from (``seed``, the resumed
    step, ``rank``) (``progress`` is loaded before ``rng``)."""
    reseed = None
    if layout is not None:
        reseed = lambda: reseed_rng(seed, progress.step, rank, megatron=rng_tracker is not None)  # noqa: E731
    parts: dict[str, Any] = {"progress": JsonPart(progress), "rng": RNGPart(rank, rng_tracker, layout, reseed)}
    if guard is not None:
        parts["guard"] = JsonPart(guard)
    for name, obj in (("sampler", sampler), ("value_tracker", value_tracker)):
        if obj is not None:
            parts[name] = StateDictPart(obj)
    return parts
