"""Checkpoint integrity: files are verified against a sha256 manifest on restore; load errors name their file."""
from __future__ import annotations

import json
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ckpt_state import fresh, make_state, parts_of, snapshot  # noqa: E402

from megatron_skpo.trainer.checkpoint import (  # noqa: E402
    MANIFEST, MARKER, CheckpointError, CheckpointManager)
from megatron_skpo.trainer.parts import JsonPart, RNGPart, StateDictPart, TrainProgress  # noqa: E402


class Tensors:
    """60 tensors, like the layers of a small model."""

    def __init__(self, value: float = 0.0):
        self.t = {f"layer{i}.weight": torch.full((64, 64), value + i) for i in range(60)}

    def state_dict(self) -> dict:
        return self.t

    def load_state_dict(self, state: dict) -> None:
        self.t = {k: v.clone() for k, v in state.items()}


def _overwrite_floats(path: Path, n: int = 32) -> int:
    """Overwrite ``n`` float32 values inside every tensor stored in a torch.save file (the zip's
    data records, which torch reads without checking their CRC); returns how many were hit."""
    with zipfile.ZipFile(path) as z:
        records = [i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 4 * (n + 64)]
    raw = bytearray(path.read_bytes())
    for info in records:
        name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
            int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
        start = info.header_offset + 30 + name_len + extra_len + 4 * 64
        raw[start:start + 4 * n] = torch.full((n,), 12345.0).numpy().tobytes()
    path.write_bytes(bytes(raw))
    return len(records)


def _saved(tmp_path: Path, step: int = 3) -> CheckpointManager:
    mgr = CheckpointManager(tmp_path, save_interval=1, keep_last=3)
    for s in range(1, step + 1):
        mgr.save(s, parts_of(make_state(s)))
    return mgr


def test_manifest_lists_every_file_and_marker_records_it(tmp_path):
    _saved(tmp_path, 1)
    ck = tmp_path / "step_00000001"
    manifest = json.loads((ck / MANIFEST).read_text())["files"]
    on_disk = sorted(p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file())
    assert sorted(manifest) == sorted(set(on_disk) - {MANIFEST, MARKER}) and "model/state.pt" in manifest
    import hashlib

    assert json.loads((ck / MARKER).read_text())["manifest_sha256"] == \
        hashlib.sha256((ck / MANIFEST).read_bytes()).hexdigest()


def test_overwritten_floats_in_60_tensors_are_caught(tmp_path):
    mgr = CheckpointManager(tmp_path, save_interval=1, keep_last=3)
    mgr.save(1, {"model": StateDictPart(Tensors(1.0))})
    mgr.save(2, {"model": StateDictPart(Tensors(2.0))})
    assert _overwrite_floats(tmp_path / "step_00000002" / "model" / "state.pt") == 60
    target = Tensors()
    with pytest.raises(CheckpointError, match=r"part 'model': file .*step_00000002/model/state\.pt is corrupt: "
                                              r"sha256 .* \(same size\).*resume from the previous one "
                                              r"\(step_00000001\)"):
        mgr.restore({"model": StateDictPart(target)})
    assert float(target.t["layer0.weight"][0, 0]) == 0.0  # nothing was loaded


@pytest.mark.parametrize("part,file", [("progress", "state.json"), ("sampler", "state.pt"), ("rng", "rank_00000.pt"),
                                       ("value_tracker", "state.pt")])
def test_one_flipped_byte_in_any_part_is_caught(tmp_path, part, file):
    mgr = _saved(tmp_path)
    path = tmp_path / "step_00000003" / part / file
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"part '{part}': file .*{part}/{file} is corrupt"):
        mgr.restore(parts_of(fresh()))


class DirPart:
    """A part without ``files()`` (like the trainer's model part): every file of its directory is verified."""

    collective = False

    def __init__(self):
        self.loaded: dict[str, bytes] = {}

    def save(self, directory: Path) -> None:
        for name in ("a.bin", "b.bin"):
            (directory / name).write_bytes(name.encode() * 100)

    def load(self, directory: Path) -> None:
        self.loaded = {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_truncated_and_missing_and_added_files(tmp_path):
    mgr = _saved(tmp_path)
    ck = tmp_path / "step_00000003"
    data = (ck / "sampler" / "state.pt").read_bytes()
    (ck / "sampler" / "state.pt").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"sampler/state\.pt is corrupt: .*\(\d+ bytes, \d+ recorded\)"):
        mgr.restore(parts_of(fresh()))
    (ck / "guard" / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"part 'guard': file .*guard/state\.json is missing \(the manifest"):
        mgr.restore({"guard": parts_of(fresh())["guard"]})

    mgr.save(4, {"blob": DirPart()})
    ck = tmp_path / "step_00000004"
    (ck / "blob" / "c.bin").write_bytes(b"planted")
    with pytest.raises(CheckpointError, match=r"blob/c\.bin is not in MANIFEST\.json \(added after"):
        mgr.restore({"blob": DirPart()})
    (ck / "blob" / "c.bin").unlink()
    (ck / "blob" / "b.bin").unlink()
    with pytest.raises(CheckpointError, match=r"blob/b\.bin is missing \(the manifest lists it\)"):
        mgr.restore({"blob": DirPart()})


def test_missing_or_corrupt_manifest_is_named(tmp_path):
    mgr = _saved(tmp_path, 2)
    ck = tmp_path / "step_00000002"
    text = (ck / MANIFEST).read_text()
    (ck / MANIFEST).write_text(text.replace('"sha256": "', '"sha256": "0', 1))  # still valid JSON
    with pytest.raises(CheckpointError, match=r"MANIFEST\.json does not match the sha256 the COMPLETE marker "
                                              r"recorded.*step_00000001"):
        mgr.restore(parts_of(fresh()))
    (ck / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"no MANIFEST\.json, so its files cannot be verified"):
        mgr.restore(parts_of(fresh()))


def test_unreadable_marker_names_the_file(tmp_path):
    mgr = _saved(tmp_path, 1)
    (tmp_path / "step_00000001" / MARKER).write_text('{"step": 1, "parts"')
    with pytest.raises(CheckpointError, match=r"unreadable COMPLETE marker .*step_00000001/COMPLETE.*no earlier one"):
        mgr.restore(parts_of(fresh()))


class GarbageSave(StateDictPart):
    """A part whose file was bad when written (so the manifest matches it)."""

    def save(self, directory: Path) -> None:
        (directory / "state.pt").write_bytes(b"\x80\x04not a pickle at all")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_errors_name_the_part_and_file(tmp_path):
    mgr = CheckpointManager(tmp_path, save_interval=1, keep_last=3)
    progress = TrainProgress(step=1)
    mgr.save(1, {"progress": JsonPart(progress), "sampler": GarbageSave(progress)})
    with pytest.raises(CheckpointError, match=r"part 'sampler' failed to load: ValueError: checkpoint file "
                                              r".*sampler/state\.pt: unreadable \("):
        mgr.restore({"sampler": StateDictPart(TrainProgress())})

    class Strict(TrainProgress):
        def load_state_dict(self, state):
            raise KeyError("consumed_prompts")

    with pytest.raises(CheckpointError, match=r"progress/state\.json: its state does not fit Strict"):
        mgr.restore({"progress": JsonPart(Strict())})


def test_each_rank_verifies_its_own_rng_file(tmp_path):
    barrier = threading.Barrier(2)

    def save(r: int) -> None:
        CheckpointManager(tmp_path, 1, 1, rank=r, barrier=barrier.wait).save(
            4, {"progress": JsonPart(TrainProgress(step=4)), "rng": RNGPart(r)})

    threads = [threading.Thread(target=save, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(timeout=30) for t in threads]
    path = tmp_path / "step_00000004" / "rng" / "rank_00001.pt"
    raw = bytearray(path.read_bytes())
    raw[-30] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert CheckpointManager(tmp_path, 1, 1, rank=0).restore({"rng": RNGPart(0)}).step == 4
    with pytest.raises(CheckpointError, match=r"rng/rank_00001\.pt is corrupt"):
        CheckpointManager(tmp_path, 1, 1, rank=1).restore({"rng": RNGPart(1)})


def test_intact_checkpoint_restores_identically(tmp_path):
    mgr = _saved(tmp_path)
    objs = fresh()
    assert mgr.restore(parts_of(objs)).step == 3 and snapshot(objs) == snapshot(make_state(3))


def test_non_finite_weights_are_never_saved(tmp_path):
    """A diverged policy (NaN weights) raises on save, naming the tensor; nothing is written."""
    import types

    from megatron_skpo.trainer.model_state import ModelPart

    gpt = torch.nn.Linear(2, 2)
    with torch.no_grad():
        gpt.weight[0, 0] = float("nan")
    policy = types.SimpleNamespace(gpt=gpt)
    with pytest.raises(ValueError, match="refusing to save non-finite weights: weight has NaN"):
        ModelPart(policy, rank=0).save(tmp_path)
    assert list(tmp_path.iterdir()) == []
