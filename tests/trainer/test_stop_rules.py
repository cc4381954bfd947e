"""The stop-on-signal decisions of ``trainer/lifecycle.Stop``, with a hand-set clock (one rank).

Hand-worked: a step takes 10 s and a save 2 s (the estimates of the previous ones); SIGTERM arrives
at t = 100 s, 5 s into a step. Between stages the rest of the step (10 - 5 = 5 s) plus a save (2 s)
ends 7 s after the signal: within a 25 s grace the step is finished, within a 6 s grace it is
abandoned. At the end of a step the save (2 s) fits a 25 s grace and is written; it does not fit 1 s.
"""
from __future__ import annotations

import signal

import pytest

from megatron_skpo.trainer import lifecycle
from megatron_skpo.trainer.lifecycle import Stop, Stopped


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def _handlers():
    """Every test's signal handlers back as they were (a signalled Stop leaves the defaults)."""
    before = {s: signal.getsignal(s) for s in lifecycle.SIGNALS}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


@pytest.fixture
def clock(monkeypatch):
    c = Clock(90.0)
    monkeypatch.setattr(lifecycle.time, "monotonic", c)
    return c


def _stop(clock, grace_s: float, can_save: bool = True) -> Stop:
    """A Stop after one measured 10 s step (step 4, saved in 2 s), 5 s into step 5, SIGTERM at t = 100."""
    stop = Stop(grace_s, can_save)
    stop.last_saved = lambda: 4
    stop.clock()  # step 4 starts at t = 90 ...
    clock.t = 98.0
    stop.timed(lambda: clock.__setattr__("t", 100.0))  # ... its save takes 2 s ...
    stop.end_of_step(4, True, lambda: None)  # ... and it ends at t = 100: step_s = 10 s
    stop.clock()  # step 5 starts at t = 100 (the save is inside the step's time here)
    clock.t = 105.0
    stop._handle(signal.SIGTERM, None)
    return stop


def test_the_first_signal_arms_the_second_to_end_the_process(clock):
    """After the first signal a second one takes the default action, also after close (the process is
    on its way out: a shutdown that hangs still ends on the next Ctrl-C); without a signal close
    restores the handlers it found."""
    before = {s: signal.getsignal(s) for s in lifecycle.SIGNALS}
    try:
        stop = _stop(clock, 25)
        assert all(signal.getsignal(s) == signal.SIG_DFL for s in lifecycle.SIGNALS)
        stop.close()
        assert all(signal.getsignal(s) == signal.SIG_DFL for s in lifecycle.SIGNALS)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    quiet = Stop(25, True)
    assert all(signal.getsignal(s) == quiet._handle for s in lifecycle.SIGNALS)
    quiet.close()
    assert {s: signal.getsignal(s) for s in lifecycle.SIGNALS} == before


def test_between_stages_the_step_finishes_when_it_and_a_save_fit_the_grace(clock):
    stop = _stop(clock, 25)
    try:
        stop.check()  # 5 + 2 = 7 s after the signal: finish the step
        clock.t = 110.0
        saved = []
        with pytest.raises(Stopped) as e:
            stop.end_of_step(5, False, lambda: saved.append(5))
        assert saved == [5] and e.value.code == 143
        assert str(e.value) == "skpo-train: SIGTERM at step 5: checkpoint step_00000005 written; resume with the same command"
    finally:
        stop.close()


def test_between_stages_the_step_is_abandoned_when_it_would_overrun(clock):
    stop = _stop(clock, 6)
    try:
        with pytest.raises(Stopped) as e:
            stop.check()  # 7 s > 6 s
        assert str(e.value) == "skpo-train: SIGTERM at step 4: no checkpoint (the last is step 4)"
    finally:
        stop.close()


def test_at_the_end_of_a_step_a_save_that_cannot_fit_is_skipped(clock):
    stop = _stop(clock, 1)
    stop.signum = signal.SIGINT
    try:
        with pytest.raises(Stopped) as e:
            stop.end_of_step(5, False, lambda: pytest.fail("a 2 s save does not fit a 1 s grace"))
        assert e.value.code == 130 and str(e.value).endswith("no checkpoint (the last is step 4)")
    finally:
        stop.close()


def test_without_checkpoints_the_step_is_abandoned_at_once(clock):
    stop = _stop(clock, 1000, can_save=False)
    try:
        with pytest.raises(Stopped):
            stop.check()
    finally:
        stop.close()


def test_no_signal_no_stop(clock):
    stop = Stop(25, True)
    try:
        stop.clock()
        stop.check()
        stop.end_of_step(1, False, lambda: pytest.fail("no signal: no save"))
    finally:
        stop.close()


def test_reward_workers_ignore_the_launchers_sigterm():
    """torchrun and Slurm signal every process of the job: the reward workers outlive the SIGTERM (the
    trainer decides when to stop and still grades its last step), then die with the trainer."""
    import os
    import time

    from megatron_skpo.rewards.pool import RewardPool

    with RewardPool(workers=2, timeout_s=10.0) as pool:
        assert pool.score(["\\boxed{2}"] * 2, ["2", "2"])[0] == [1.0, 1.0]  # both workers up and serving
        before = [w.proc.pid for w in pool._workers]
        for pid in before:
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        assert pool.score(["\\boxed{2}", "\\boxed{3}"], ["2", "2"])[0] == [1.0, -1.0]
        assert [w.proc.pid for w in pool._workers] == before and all(w.proc.poll() is None for w in pool._workers)
