"""What clusters do to run directories: two runs on one directory (the lock), ``--overwrite`` on the
wrong directory, symlinked paths, output permissions under the umask, absurd token counts. No model
is trained: the functions are called directly, and ``skpo-train`` only with ``--dry-run``."""
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_skpo.cli.train import claim_run_dir
from megatron_skpo.cli.train import main as train_main
from megatron_skpo.config import load_config
from megatron_skpo.trainer.dir_lock import HELD_NAME, LOCK_NAME, DirBusy, DirLock
from megatron_skpo.trainer.preflight import preflight, set_aside
from fake_weights import header_only_weights

ROOT = Path(__file__).resolve().parents[2]

HOLDER = textwrap.dedent("""
    import sys, time
    from megatron_skpo.trainer.dir_lock import DirLock
    DirLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def model(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"num_attention_heads": 2, "num_key_value_heads": 1,
                                               "intermediate_size": 64, "num_hidden_layers": 2,
                                               "max_position_embeddings": 4096}))
    header_only_weights(d, 2)
    return d


def cfg(tmp_path, model, *overrides):
    return load_config(None, [f"model.hf_path={model}", "data.train.name=mawps_easy", "parallel.tp=1",
                              f"logging.dir={tmp_path / 'run'}", *overrides])


@pytest.fixture
def holder(tmp_path):
    """Start another process that holds the lock of a directory; yields (start, procs)."""
    procs = []

    def start(directory: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


# ---- 1. the lock -------------------------------------------------------------------------------------------


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path, holder):
    run = tmp_path / "run"
    p = holder(run)
    with pytest.raises(DirBusy) as e:
        DirLock(run).acquire()
    msg = str(e.value)
    assert msg.startswith(f"logging.dir {run} is in use by pid {p.pid} on host {socket.gethostname()} since ")
    assert f"(lock file {run / LOCK_NAME}); wait for it, or use another logging.dir" in msg
    p.send_signal(signal.SIGKILL)  # a crash: the kernel drops the flock, nothing stale is left
    p.wait()
    lock = DirLock(run).acquire()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_dry_run_reports_a_held_lock_and_a_start_writes_nothing(tmp_path, model, holder, capsys):
    run = tmp_path / "run"
    p = holder(run)
    args = [f"model.hf_path={model}", "data.train.name=mawps_easy", "parallel.tp=1", f"logging.dir={run}"]
    assert train_main(args + ["--dry-run"]) == 2
    assert f"skpo-train: logging.dir {run} is in use by pid {p.pid}" in capsys.readouterr().err
    assert train_main(args) == 2  # preflight stops it before the lock or any write
    assert sorted(x.name for x in run.iterdir()) == [LOCK_NAME]


def test_the_lock_is_checked_again_after_preflight(tmp_path, model, holder):
    """Two starts that both passed preflight: the second to lock stops with the holder's name."""
    c = cfg(tmp_path, model, f"checkpoint.dir={tmp_path / 'ckpt'}")
    p = holder(tmp_path / "ckpt")  # checkpoint.dir outside logging.dir is locked too
    (problem,) = claim_run_dir(c, overwrite=False)
    assert problem.startswith(f"checkpoint.dir {tmp_path / 'ckpt'} is in use by pid {p.pid}")
    assert DirLock(tmp_path / "run").acquire()  # the logging.dir lock taken first was given back


def test_without_flock_an_exclusive_file_with_a_stale_rule(tmp_path, monkeypatch):
    """NFS without lockd, Lustre without ``flock``: ENOLCK selects the O_EXCL file."""
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    held = run / HELD_NAME
    held.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "since": "then"}))
    lock = DirLock(run).acquire()  # same host, pid gone: stale, taken over
    assert json.loads(held.read_text())["pid"] == os.getpid()
    with pytest.raises(DirBusy, match=f"in use by pid {os.getpid()}"):
        DirLock(run).acquire()  # a live holder
    lock.release()
    assert not held.exists()
    held.write_text(json.dumps({"host": "node-elsewhere", "pid": gone.pid, "since": "then"}))
    with pytest.raises(DirBusy, match=f"on host node-elsewhere .*if no run on host node-elsewhere uses it any "
                                      f"more, remove {held}"):
        DirLock(run).acquire()  # another host's: never taken over


# ---- 2. --overwrite ----------------------------------------------------------------------------------------


def _refusals(c) -> list[str]:
    return [p for p in preflight(c, overwrite=True) if p.startswith("--overwrite")]


def test_overwrite_never_moves_the_model_a_data_directory_home_or_root(tmp_path, model, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    cases = {  # logging.dir -> the reason named
        str(model): f"is model.hf_path ({model})",
        str(tmp_path): "is a parent of model.hf_path",
        str(data): "is the directory of data.eval.path",
        str(home): "is the home directory",
        "/": "is / (/)",  # and a parent of everything else: the exact match is named
    }
    for run, needle in cases.items():
        (problem,) = _refusals(cfg(tmp_path, model, f"logging.dir={run}", f"data.eval.path={data / 'train.jsonl'}"))
        assert needle in problem and "--overwrite never moves it" in problem, problem
        with pytest.raises(ValueError, match="never moves it"):
            set_aside(cfg(tmp_path, model, f"logging.dir={run}", f"data.eval.path={data / 'train.jsonl'}"))
    assert (model / "config.json").is_file()


def test_overwrite_moves_only_a_run(tmp_path, model):
    other = tmp_path / "photos"
    (other / "a.png").parent.mkdir()
    (other / "a.png").write_bytes(b"x")
    (problem,) = _refusals(cfg(tmp_path, model, f"logging.dir={other}"))
    assert problem == (f"--overwrite: logging.dir {other} is not empty but holds no run (no config.yaml, metrics.jsonl "
                       "or checkpoint); --overwrite only moves a previous run aside: choose another logging.dir")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("x: 1\n")
    lock = DirLock(run).acquire()  # as in skpo-train: rank 0 holds it while the run is moved aside
    assert _refusals(cfg(tmp_path, model)) == []
    (moved,) = set_aside(cfg(tmp_path, model))
    assert (moved / "config.yaml").is_file() and sorted(x.name for x in run.iterdir()) == [LOCK_NAME]
    with pytest.raises(DirBusy):
        DirLock(run).acquire()  # still held: the lock file never moved
    lock.release()


# ---- 3. symlinks -------------------------------------------------------------------------------------------


def test_a_symlink_into_the_model_is_the_model(tmp_path, model):
    link = tmp_path / "link"
    link.symlink_to(model)
    for out in (link / "sub", link):
        assert any("lies in model.hf_path" in p or "is, holds or lies in model.hf_path" in p
                   for p in preflight(cfg(tmp_path, model), export_hf=str(out))), out
    run_link = tmp_path / "run-link"
    (tmp_path / "run").mkdir()
    run_link.symlink_to(tmp_path / "run")
    problems = preflight(cfg(tmp_path, model), export_hf=str(run_link))
    assert "is, holds or lies in logging.dir" in problems[0] and "the checkpoint directory" in problems[1]


# ---- 9. permissions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask-022", "umask-077"])
def test_weights_get_the_umask_permissions(tmp_path, umask, mode):
    from checkpoint_convert.hf_io import copy_side_files, save_shard
    from megatron_skpo.trainer.checkpoint import atomic_write_text

    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    os.chmod(src / "tokenizer.json", 0o400)  # the output's mode follows the umask, not the source's
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        out.mkdir()
        save_shard({"w": torch.zeros(2)}, out / "model.safetensors")  # safetensors alone makes it 0600
        copy_side_files(src, out)
        atomic_write_text(out / "latest", "step_1\n")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "tokenizer.json", "latest"):
        assert (out / name).stat().st_mode & 0o777 == mode, name


# ---- 5. token counts ---------------------------------------------------------------------------------------


def test_token_counts_are_bounded_by_the_context(tmp_path, model):
    problems = preflight(cfg(tmp_path, model, "rollout.max_response_tokens=99999999999",
                             "rollout.max_prompt_tokens=64"))
    assert problems == ["rollout.max_response_tokens = 99999999999 exceeds the model's context of 4096 tokens "
                        f"(max_position_embeddings in {model}/config.json): no sequence can be that long"]
    c = cfg(tmp_path, model, "rollout.max_prompt_tokens=64", "rollout.max_response_tokens=64",
            "rollout.max_model_len=128", "validation.max_tokens=200", "data.eval.name=mawps_easy")
    assert preflight(c) == ["validation.max_tokens = 200 exceeds the model's context of 128 tokens "
                            "(rollout.max_model_len): no sequence can be that long"]
    cfg_json = json.loads((model / "config.json").read_text())
    del cfg_json["max_position_embeddings"]
    (model / "config.json").write_text(json.dumps(cfg_json))
    (problem,) = preflight(cfg(tmp_path, model, "rollout.max_response_tokens=99999999999"))
    assert problem.startswith("rollout.max_response_tokens = 99999999999 exceeds the hard cap of 1048576 tokens")
