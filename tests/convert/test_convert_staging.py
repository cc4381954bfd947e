"""Converter outputs never destroy inputs, killed runs leave nothing behind forever, outputs get normal permissions."""
from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import socket
import sys
from pathlib import Path

import pytest
from convert_fixtures import save_tiny

from checkpoint_convert.cli import main as cli
from checkpoint_convert.convert import hf_to_mcore, mcore_to_hf
from checkpoint_convert.staging import ConvertError, check_separate, recover_stale, staged_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("staging")
    save_tiny("llama", root / "models" / "hf", max_shard_size="100MB")
    return root / "models" / "hf"


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "parent", "inside", "symlink"])
def test_output_overlapping_the_input_is_refused(hf, tmp_path, where, capsys):
    before = _snapshot(hf)
    link = tmp_path / "link"
    link.symlink_to(hf)
    out = {"same": hf, "parent": hf.parent, "inside": hf / "converted", "symlink": link}[where]
    assert cli(["hf-to-mcore", "--hf", str(hf), "--out", str(out), "--force"]) == 2
    err = json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
    assert str(out) in err and str(hf) in err and "--hf" in err
    assert _snapshot(hf) == before  # not a byte of the input lost
    assert not (hf / "converted").exists()
    with pytest.raises(ConvertError, match="--hf"):
        hf_to_mcore(hf, out, force=True)
    assert _snapshot(hf) == before


def test_mcore_to_hf_output_overlapping_mcore_or_like_is_refused(tmp_path):
    mc, like = tmp_path / "mc", tmp_path / "like"
    mc.mkdir(), like.mkdir()
    (mc / "weights").write_text("precious")
    with pytest.raises(ConvertError, match=r"is the input --mcore"):
        mcore_to_hf(mc, mc, force=True)
    with pytest.raises(ConvertError, match=r"lies inside the input --like"):
        mcore_to_hf(mc, like / "out", like=like, force=True)
    with pytest.raises(ConvertError, match=r"holds the input --mcore"):
        check_separate(tmp_path, {"--mcore": mc})
    assert (mc / "weights").read_text() == "precious"


def test_gguf_file_inside_the_output_is_refused(tmp_path, capsys):
    gguf = tmp_path / "models" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert cli(["hf-to-mcore", "--hf", str(gguf), "--out", str(gguf.parent), "--force"]) == 2
    assert "holds the input --hf" in capsys.readouterr().err and gguf.read_bytes() == b"GGUF"


KILLED_WRITER = """import sys, time
from checkpoint_convert.staging import staged_dir
with staged_dir(sys.argv[1], force=True) as tmp:
    (tmp / "partial").write_text("x")
    print(tmp.name, flush=True)
    time.sleep(600)
"""


def _staging_child(out: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True,
                             env=env)
    return child, child.stdout.readline().strip()


@pytest.mark.slow
def test_killed_run_leftovers_are_cleaned_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    live, live_tmp = _staging_child(out)
    killed, killed_tmp = _staging_child(out)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert (tmp_path / killed_tmp).is_dir()  # what a kill -9 leaves behind
        with staged_dir(out) as tmp:
            (tmp / "done").write_text("x")
        assert not (tmp_path / killed_tmp).exists()  # the dead run's staging directory is gone
        assert (tmp_path / live_tmp / "partial").is_file()  # a running conversion's is untouched
    finally:
        live.kill()
        live.wait()
    recover_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_previous_output_is_restored_after_a_kill_between_the_renames(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{socket.gethostname()}-{_dead_pid()}-1"
    old.mkdir()
    (old / "model.safetensors").write_text("previous output")
    with pytest.raises(ConvertError, match="not empty"):
        with staged_dir(out):  # the previous output is back, and protected without --force
            pass
    assert (out / "model.safetensors").read_text() == "previous output" and not old.exists()


def test_leftovers_that_are_not_provably_ours_are_kept(tmp_path, caplog):
    foreign = [tmp_path / ".out.tmp-otherhost-123-456-0123abcd", tmp_path / ".out.tmp-abcd1234",
               tmp_path / f".out.tmp-{socket.gethostname()}-{os.getpid()}-0-0123abcd"]  # our own, alive
    for p in foreign:
        p.mkdir()
    with caplog.at_level(logging.WARNING):
        with staged_dir(tmp_path / "out"):
            pass
    assert all(p.is_dir() for p in foreign)
    assert ".out.tmp-otherhost-123-456-0123abcd" in caplog.text and ".out.tmp-abcd1234" in caplog.text


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_get_normal_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        with staged_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "out" / "f").stat().st_mode) == 0o666 & ~umask


@pytest.mark.slow
def test_converted_checkpoint_is_readable_by_others(hf, tmp_path):
    old = os.umask(0o022)
    try:
        hf_to_mcore(hf, tmp_path / "mc")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "mc").stat().st_mode) == 0o755
