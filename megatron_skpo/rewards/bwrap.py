"""The bubblewrap (``bwrap``) command line of the code sandbox, and the checks that it can run here.

What a sandboxed program sees (built by :func:`bwrap_command`):

- fresh user, PID, mount, network, IPC, UTS and cgroup namespaces (``--unshare-all``); no
  network device but its own loopback; no further user namespaces inside (``--disable-userns``);
- ``/usr`` read-only, ``/lib``, ``/lib64``, ``/bin``, ``/sbin`` as on the host (symlinks into
  ``/usr`` on merged-/usr systems, read-only binds otherwise), a new ``/proc`` that shows only
  the sandbox's own processes, a minimal ``/dev`` (null, zero, random, tty, ...);
- the interpreter's installation read-only when it lives outside ``/usr`` (pyenv, conda, a
  relocated build), with its ``site-packages`` hidden; never the project checkout or a home
  directory as a whole (see :func:`sandbox_interpreter`);
- private, size-limited tmpfs mounts on ``/tmp`` (the working directory) and ``/dev/shm``;
  everything else (``/``, ``/dev``) read-only. Nothing of the host's ``/tmp``, ``/dev/shm``,
  ``/etc``, ``/home``, ``/root`` or the project is visible, and nothing written persists;
- the program and its runner as read-only files under ``/sandbox`` (copied in from file
  descriptors: no host directory of ours is bound).

When we are root, ``bwrap`` is started as user ``nobody`` (uid/gid 65534): bwrap run by root keeps
every capability inside the sandbox, and the kernel never applies RLIMIT_NPROC to host uid 0. As
``nobody`` (or any ordinary user) bwrap needs unprivileged user namespaces, which
:func:`megatron_skpo.rewards.code_sandbox.check_sandbox` verifies once (its error says what to
change when they are off).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

NOBODY = 65534
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding megatron_skpo/
INSTALL_HINT = ("install bubblewrap: `apt-get install bubblewrap` (Debian/Ubuntu), `dnf install bubblewrap` "
                "(Fedora/RHEL) or `apk add bubblewrap` (Alpine)")
_TOP_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")


class SandboxUnavailable(RuntimeError):
    """The code sandbox cannot run here; code rewards refuse to run rather than run unsandboxed."""


@dataclass(frozen=True)
class Interpreter:
    """A Python the sandbox can run: its path (the same inside and outside) and the binds it needs."""

    path: str
    binds: tuple[str, ...]


def bwrap_path() -> str:
    """Absolute path of ``bwrap``; :class:`SandboxUnavailable` with install instructions if missing."""
    # PATH first, then the standard places (a trainer started with a bare PATH still finds it)
    found = shutil.which("bwrap", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/bin"]))
    if found is None:
        raise SandboxUnavailable(f"code sandbox: bubblewrap (bwrap) was not found on PATH; {INSTALL_HINT}. "
                                 "Code rewards never run candidate programs outside the sandbox.")
    return found


MIN_VERSION = (0, 8, 0)  # --disable-userns appeared in 0.8.0, --size in 0.7.0


def check_version(bwrap: str) -> tuple[int, ...]:
    """bwrap's version; :class:`SandboxUnavailable` if it is older than :data:`MIN_VERSION`."""
    out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    version = tuple(int(v) for v in match.groups()) if match else (0, 0, 0)
    if version < MIN_VERSION:
        raise SandboxUnavailable(
            f"code sandbox: {bwrap} reports {out or 'no version'!r}; the sandbox needs bubblewrap "
            f"{'.'.join(map(str, MIN_VERSION))} or newer (--disable-userns, --size); {INSTALL_HINT} from a "
            "newer release (Debian 12, Ubuntu 24.04 and Fedora ship one)")
    return version


def drops_to_nobody() -> bool:
    """Whether bwrap is started as ``nobody`` (we are root)."""
    return os.geteuid() == 0


def _reachable_by_others(path: Path) -> bool:
    """Every directory above ``path`` is searchable by other users, and ``path`` is readable by them."""
    return all(os.stat(d).st_mode & 0o001 for d in path.parents) and bool(os.stat(path).st_mode & 0o004)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _interpreter_from(exe: Path, prefix: Path) -> Interpreter | None:
    """``exe`` as a sandbox interpreter, or None when it is unusable here (reason in the docstring
    of :func:`sandbox_interpreter`)."""
    if not exe.is_file() or not os.access(exe, os.X_OK):
        return None
    if drops_to_nobody() and not (_reachable_by_others(exe) and _reachable_by_others(prefix)):
        return None
    if exe.is_relative_to("/usr") and prefix.is_relative_to("/usr"):
        return Interpreter(str(exe), ())
    if not exe.is_relative_to(prefix):  # the binary would not be visible inside
        return None
    home = Path.home().resolve()
    if prefix == Path("/") or _overlaps(prefix, PROJECT_ROOT) or prefix == home or prefix in home.parents:
        return None
    binds = ["--ro-bind", str(prefix), str(prefix)]
    paths = sysconfig.get_paths(vars={"base": str(prefix), "platbase": str(prefix),
                                      "installed_base": str(prefix), "installed_platbase": str(prefix)})
    for hidden in sorted({paths["purelib"], paths["platlib"]}):
        if Path(hidden).is_dir() and Path(hidden).is_relative_to(prefix):
            binds += ["--tmpfs", hidden, "--remount-ro", hidden]  # installed packages: not the sandbox's
    return Interpreter(str(exe), tuple(binds))


@lru_cache(maxsize=1)
def sandbox_interpreter() -> Interpreter:
    """The interpreter candidate programs run with.

    First choice: the real binary behind ``sys.executable`` (a venv's ``python`` is a symlink; the
    binary finds its standard library from its own location, so the venv itself is not needed).
    It is refused when started as ``nobody`` it could not be read (``/root`` is mode 0700, so a
    pyenv under root's home is out), when its installation prefix overlaps the project checkout,
    or when the prefix is ``/``, the home directory or above it (binding that would expose it).
    Second choice: the system's ``/usr/bin/python3``, which the ``/usr`` bind already provides.
    """
    candidates = [(Path(os.path.realpath(sys.executable)), Path(os.path.realpath(sys.base_prefix))),
                  (Path(os.path.realpath("/usr/bin/python3")), Path("/usr"))]
    for exe, prefix in candidates:
        interp = _interpreter_from(exe, prefix)
        if interp is not None:
            return interp
    exe, prefix = candidates[0]
    raise SandboxUnavailable(
        f"code sandbox: no Python interpreter it can use. {exe} (prefix {prefix}) is refused: "
        + ("when we run as root the sandbox runs as user 'nobody', who must be able to read it; " if drops_to_nobody()
           else "")
        + "its prefix must not be /, a home directory or hold the project checkout. /usr/bin/python3 does not exist: "
        "install the system's python3 (`apt-get install python3`)")


def _top_level_binds() -> list[str]:
    args = []
    for d in _TOP_DIRS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    return args


def bwrap_command(interp: Interpreter, program_fd: int, runner_fd: int, info_fd: int, tmpfs_mb: int,
                  runner_args: tuple[str, ...]) -> list[str]:
    """The full ``bwrap`` argv. ``program_fd``/``runner_fd`` are open files copied to
    ``/sandbox/main.py``/``/sandbox/runner.py``; bwrap writes the sandbox's host pid to ``info_fd``.

    The runner is the sandbox's PID 1 (``--as-pid-1``): when it exits, the kernel kills every
    process left in the namespace, and bwrap reaps it with ``waitpid`` (bwrap's own init reports
    its exit through an eventfd instead and its outer process exits before reaping it: on a host
    whose PID 1 does not reap orphans, that leaks one zombie per run).
    """
    size = str(tmpfs_mb * 2**20)
    return [
        bwrap_path(), "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
        "--as-pid-1", "--cap-drop", "ALL", "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr", *_top_level_binds(), *interp.binds,
        "--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm",
        "--size", size, "--tmpfs", "/tmp",
        "--ro-bind-data", str(program_fd), "/sandbox/main.py", "--ro-bind-data", str(runner_fd), "/sandbox/runner.py",
        "--remount-ro", "/dev", "--remount-ro", "/",
        "--chdir", "/tmp", "--info-fd", str(info_fd),
        interp.path, "-I", "-S", "/sandbox/runner.py", *runner_args,
    ]


def spawn_user() -> dict:
    """``subprocess.Popen`` keyword arguments that start bwrap as ``nobody`` when we are root (done
    by Popen's own child code: no ``preexec_fn``, which is unsafe in a process with threads)."""
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []} if drops_to_nobody() else {}
