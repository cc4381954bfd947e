"""The trainer's per-rank state at a changed layout (``trainer/parts.py``, ``trainer/drift.py``).

A checkpoint saved by one layout (world size, TP/PP/EP) and resumed at another: the drift stores of
the saved ranks are merged and re-split so that every prompt lands on exactly one data-parallel rank
of the new job (on every model-parallel rank of it) and none is lost; the RNG streams are reseeded
from (seed, step, rank); an unchanged layout still loads each rank's own state. Threads stand in for
the ranks of a save (the manager's barrier), as in ``test_checkpoint.py``.
"""
from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_skpo.trainer.checkpoint import CheckpointManager
from megatron_skpo.trainer.drift import DriftStore, home_rank
from megatron_skpo.trainer.parts import (
    Layout, RankStateDictPart, RNGPart, TrainProgress, reseed_rng, training_parts)

KEYS_A = [f"q{i}" for i in range(0, 12)]  # trained by data-parallel rank 0 of the saved job
KEYS_B = [f"q{i}" for i in range(12, 20)] + [3, 17]  # by data-parallel rank 1 (int keys too)
SAVED = Layout(world=4, tp=2)  # ranks 0, 1: data-parallel rank 0; ranks 2, 3: data-parallel rank 1


def _entry(key) -> tuple[torch.Tensor, int, torch.Tensor]:
    n = int(str(key).lstrip("q"))
    return torch.arange(n, n + 3 + n % 4), 2, -0.01 * (n + 1) * torch.arange(1, 2 + n % 4, dtype=torch.float32)


def _store(keys) -> DriftStore:
    store = DriftStore()
    for k in keys:
        store.remember(k, *_entry(k))
    return store


def _saved_stores(directory: Path) -> None:
    """The 4 ranks of ``SAVED``: each model-parallel pair holds the same store."""
    for rank, keys in enumerate([KEYS_A, KEYS_A, KEYS_B, KEYS_B]):
        RankStateDictPart(_store(keys), rank, SAVED, DriftStore.merge_states).save(directory)


def _loaded(directory: Path, rank: int, layout: Layout, dp_rank: int, dp_size: int) -> tuple[DriftStore, list]:
    store = DriftStore()
    part = RankStateDictPart(store, rank, layout, partial(DriftStore.merge_states, dp_rank=dp_rank, dp_size=dp_size))
    files = part.files(directory)
    part.load(directory)
    return store, sorted(p.name for p in files)


def test_same_layout_loads_each_ranks_own_store(tmp_path):
    _saved_stores(tmp_path)
    store, files = _loaded(tmp_path, 2, SAVED, dp_rank=1, dp_size=2)
    assert files == ["layout.json", "rank_00002.pt"]
    assert store.state_dict()["keys"] == KEYS_B


@pytest.mark.parametrize("world, tp", [(3, 1), (2, 1), (1, 1), (2, 2)])
def test_drift_stores_merge_and_resplit_without_loss(tmp_path, world, tp):
    """Every saved prompt is held by exactly one data-parallel rank of the new job, with its saved
    response and log-probs, and by every model-parallel rank of that data-parallel rank."""
    _saved_stores(tmp_path)
    layout, dp_size = Layout(world=world, tp=tp), world // tp
    held: dict = {}
    for rank in range(world):
        dp_rank = rank // tp  # Megatron's order: tensor-parallel ranks are adjacent
        store, files = _loaded(tmp_path, rank, layout, dp_rank, dp_size)
        assert files == ["layout.json"] + [f"rank_{r:05d}.pt" for r in range(SAVED.world)]
        state = store.state_dict()
        assert all(home_rank(k, dp_size) == dp_rank for k in state["keys"])
        for k, t, p, lp in zip(state["keys"], state["tokens"], state["prompt_lens"], state["logp"]):
            want = _entry(k)
            assert torch.equal(t, want[0]) and p == want[1] and torch.equal(lp, want[2])
        held.setdefault(dp_rank, []).append(sorted(map(str, state["keys"])))
    for copies in held.values():  # the model-parallel ranks of one data-parallel rank agree
        assert all(c == copies[0] for c in copies)
    firsts = [copies[0] for copies in held.values()]
    assert sorted(k for keys in firsts for k in keys) == sorted(map(str, KEYS_A + KEYS_B))  # once each
    if dp_size > 1:
        assert all(firsts), "a data-parallel rank got no prompt: the split is degenerate"


def test_a_changed_layout_without_merge_is_refused(tmp_path):
    _saved_stores(tmp_path)
    part = RankStateDictPart(DriftStore(), 0, Layout(world=2))
    with pytest.raises(ValueError, match=r"saved by 4 rank\(s\) at tp=2 .* this job is 2 rank\(s\) at tp=1.*"
                                         r"cannot be resharded"):
        part.load(tmp_path)


def test_differing_copies_keep_the_lowest_ranks_and_warn(caplog):
    a, b = _store(["q1", "q2"]).state_dict(), _store(["q2"]).state_dict()
    b["logp"][0] = b["logp"][0] + 1.0
    with caplog.at_level(logging.WARNING):
        merged = DriftStore.merge_states([a, b])
    assert merged["keys"] == ["q1", "q2"] and torch.equal(merged["logp"][1], a["logp"][1])
    assert "1 prompt(s) saved by several ranks with different responses" in caplog.text
    with pytest.raises(ValueError, match="data-parallel rank 2 of 2"):
        DriftStore.merge_states([a], dp_rank=2, dp_size=2)


def test_home_rank_is_the_same_in_every_process():
    """Python's str hash differs between processes; the home of a prompt must not."""
    keys = [f"q{i}" for i in range(40)] + list(range(10))
    code = ("from megatron_skpo.trainer.drift import home_rank; "
            f"print([home_rank(k, 4) for k in {keys!r}])")
    here = [home_rank(k, 4) for k in keys]
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == str(here)
    assert set(here) == {0, 1, 2, 3}


def _draws() -> tuple:
    return random.random(), np.random.rand(), torch.rand(2).tolist()


def _save_rng(directory: Path) -> None:
    for rank in range(2):
        random.seed(rank), np.random.seed(rank), torch.manual_seed(rank)
        RNGPart(rank, layout=Layout(world=2)).save(directory)


def test_rng_streams_are_reseeded_at_another_layout(tmp_path, caplog):
    _save_rng(tmp_path)
    part = RNGPart(0, layout=Layout(world=1), reseed=lambda: reseed_rng(7, 5, 0))
    assert [p.name for p in part.files(tmp_path)] == ["layout.json"]
    with caplog.at_level(logging.WARNING):
        part.load(tmp_path)
    resumed = _draws()
    assert "random streams cannot be resharded" in caplog.text
    reseed_rng(7, 5, 0)
    assert _draws() == resumed
    RNGPart(0, layout=Layout(world=2)).load(tmp_path)  # the saved rank 0's streams: not these
    assert _draws() != resumed
    reseed_rng(7, 5, 1)  # another rank: its own Python/NumPy streams, torch's shared by all ranks
    other = _draws()
    assert other[:2] != resumed[:2] and other[2] == resumed[2]
    with pytest.raises(ValueError, match=r"RNG streams saved by 2 rank\(s\).*resume with the saved layout"):
        RNGPart(0, layout=Layout(world=1)).load(tmp_path)


def test_manager_resumes_a_two_rank_checkpoint_on_one_rank(tmp_path):
    """Two ranks save progress, RNG streams and their drift stores; one rank restores all of it: the
    progress, every prompt of both stores, streams reseeded at the restored step."""
    barrier = threading.Barrier(2)
    errors: list = []

    def save(rank: int) -> None:
        try:
            mgr = CheckpointManager(tmp_path, 1, 1, rank=rank, barrier=barrier.wait)
            parts = training_parts(rank, TrainProgress(step=6, metrics_step=6), layout=Layout(world=2), seed=7)
            parts["drift"] = RankStateDictPart(_store([KEYS_A, KEYS_B][rank]), rank, Layout(world=2))
            mgr.save(6, parts)
        except Exception as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=save, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    assert not errors
    progress, store = TrainProgress(), DriftStore()
    parts = training_parts(0, progress, layout=Layout(world=1), seed=7)
    parts["drift"] = RankStateDictPart(store, 0, Layout(world=1), DriftStore.merge_states)
    assert CheckpointManager(tmp_path, 1, 1).restore(parts).step == 6
    resumed = _draws()
    assert progress.step == 6 and sorted(map(str, store.state_dict()["keys"])) == sorted(map(str, KEYS_A + KEYS_B))
    reseed_rng(7, 6, 0)  # the restored step (progress loads before the streams)
    assert _draws() == resumed
