"""Untrusted Megatron checkpoints: crafted pickles are refused before they run, real checkpoints still convert."""
from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from convert_fixtures import not_bit_exact, read_all, save_tiny

from checkpoint_convert.cli import main as cli
from checkpoint_convert.convert import hf_to_mcore, mcore_to_hf
from checkpoint_convert.staging import ConvertError
from checkpoint_convert.untrusted import (
    UntrustedCheckpointError, check_byte_objects, check_common, load_dist_metadata)


class RunsCode:
    """Unpickling this runs ``touch MARKER`` (what a crafted checkpoint would do, only harmless)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("untrusted")
    save_tiny("llama", root / "hf", max_shard_size="100MB")
    hf_to_mcore(root / "hf", root / "mc")
    return root


def _copy(models: Path, tmp: Path) -> tuple[Path, Path]:
    ck = tmp / "mc"
    shutil.copytree(models / "mc", ck)
    return ck, ck / "release"


def test_real_checkpoint_loads_and_converts_bit_exact(models, tmp_path):
    from torch.distributed.checkpoint.metadata import Metadata

    assert isinstance(load_dist_metadata(models / "mc" / "release"), Metadata)
    mcore_to_hf(models / "mc", tmp_path / "back")
    assert not_bit_exact(read_all(models / "hf"), read_all(tmp_path / "back")) == []


def test_malicious_metadata_is_refused_before_it_runs(models, tmp_path, capsys):
    ck, release = _copy(models, tmp_path)
    marker = tmp_path / "pwned"
    (release / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(UntrustedCheckpointError, match=r"\.metadata: refusing to unpickle posix\.system.*"
                                                       r"--trust-checkpoint"):
        mcore_to_hf(ck, tmp_path / "out")
    assert cli(["mcore-to-hf", "--mcore", str(ck), "--out", str(tmp_path / "out")]) == 2
    assert "refusing to unpickle posix.system" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()
    # The payload is live: the documented switch loads the file as torch does, and it runs.
    with pytest.raises(ConvertError, match="not a checkpoint Metadata"):
        load_dist_metadata(release, trust=True)
    assert marker.exists()


def test_corrupt_metadata_is_a_clear_error(models, tmp_path):
    ck, release = _copy(models, tmp_path)
    data = (release / ".metadata").read_bytes()
    (release / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvertError, match=r"\.metadata: unreadable distributed-checkpoint metadata"):
        mcore_to_hf(ck, tmp_path / "out")


def _rewrite_metadata(release: Path, edit) -> None:
    metadata = load_dist_metadata(release)
    edit(metadata)
    (release / ".metadata").write_bytes(pickle.dumps(metadata))


def test_chunk_files_outside_the_checkpoint_are_refused(models, tmp_path):
    ck, release = _copy(models, tmp_path)

    def escape(metadata):
        index, info = next(iter(metadata.storage_data.items()))
        metadata.storage_data[index] = type(info)(**{**vars(info), "relative_path": "../../../etc/passwd"})

    _rewrite_metadata(release, escape)
    with pytest.raises(UntrustedCheckpointError, match=r"stored in '\.\./\.\./\.\./etc/passwd', outside"):
        mcore_to_hf(ck, tmp_path / "out")


def test_malicious_common_pt_is_refused(models, tmp_path):
    ck, release = _copy(models, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"checkpoint_version": 3.0, "iteration": RunsCode(marker)}, release / "common.pt")
    with pytest.raises(UntrustedCheckpointError, match=r"common\.pt: refused by torch\.load\(weights_only=True\): "
                                                       r".*GLOBAL posix\.system"):
        check_common(release)
    with pytest.raises(UntrustedCheckpointError, match=r"common\.pt"):
        mcore_to_hf(ck, tmp_path / "out")
    assert not marker.exists()


def test_malicious_byte_object_is_refused_by_verify(models, tmp_path, capsys):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ck, release = _copy(models, tmp_path)
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(RunsCode(marker), payload)
    (release / "evil.distcp").write_bytes(payload.getvalue())

    def swap(metadata):
        key = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
        index = next(i for i in metadata.storage_data if i.fqn == key)
        info = metadata.storage_data[index]
        metadata.storage_data[index] = type(info)(**{**vars(info), "relative_path": "evil.distcp", "offset": 0,
                                                      "length": len(payload.getvalue())})

    assert check_byte_objects(release, load_dist_metadata(release)) == 16  # the real objects pass
    _rewrite_metadata(release, swap)
    with pytest.raises(UntrustedCheckpointError, match=r"evil\.distcp \(object '.*_extra_state.*' at byte 0\): "
                                                       r"refused by torch\.load\(weights_only=True\): .*posix\.system"):
        check_byte_objects(release, load_dist_metadata(release))
    assert cli(["verify", "--hf", str(models / "hf"), "--mcore", str(ck)]) == 2
    assert "evil.distcp" in capsys.readouterr().err and not marker.exists()
