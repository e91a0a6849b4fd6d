"""dyncompile/thread_guard.py: the policy that moves TVM's CPU pool to one thread while calls are slow (a busy
machine) and back to every core when they are not, on scripted call times and a scripted clock."""

import pytest

from dyncompile import thread_guard
from dyncompile.thread_guard import PROBE_AFTER_CALLS, RETRY_MAX_S, RETRY_S, STRIKES, ThreadGuard


class Machine:
    """A 2-core pool whose calls take `fast` seconds, or `busy` on every core while `busy_now` (one thread:
    always `single`)."""

    def __init__(self, fast=0.0003, single=0.0005, busy=0.1):
        self.fast, self.single, self.busy = fast, single, busy
        self.now, self.busy_now, self.resizes = 0.0, False, []
        self.guard = ThreadGuard(2, self.resizes.append, clock=lambda: self.now)

    def call(self, key="w100") -> float:
        self.guard.before(key)
        seconds = self.single if self.guard.threads == 1 else (self.busy if self.busy_now else self.fast)
        self.guard.after(key, seconds)
        self.now += seconds + 0.001
        return seconds

    def calls(self, n, key="w100") -> list[float]:
        return [self.call(key) for _ in range(n)]


def test_an_idle_machine_keeps_every_core_after_one_probe_per_subnet():
    m = Machine()
    times = m.calls(200) + m.calls(200, key="w50")
    assert m.guard.threads == 2
    assert times.count(m.single) == 2  # the one single-thread call each sub-net gets after its first few
    assert m.resizes == [1, 2, 1, 2]


def test_a_busy_machine_falls_back_to_one_thread_within_a_few_calls():
    m = Machine()
    m.calls(PROBE_AFTER_CALLS + 5)
    m.busy_now = True
    times = m.calls(50)
    assert m.guard.threads == 1
    assert times.count(m.busy) == STRIKES  # three slow calls, then every call on one thread
    assert m.resizes[-1] == 1


def test_it_returns_to_every_core_when_the_machine_is_idle_again():
    m = Machine()
    m.calls(10)
    m.busy_now = True
    m.calls(10)
    assert m.guard.threads == 1
    m.busy_now = False
    m.now += RETRY_S  # the next call tries every core, is fast, and the guard stays there
    m.calls(20)
    assert m.guard.threads == 2 and m.guard.retry_s == RETRY_S


def test_a_machine_that_stays_busy_costs_one_slow_call_per_retry_and_the_wait_doubles():
    m = Machine()
    m.calls(10)
    m.busy_now = True
    m.calls(10)
    slow_calls, waits = 0, []
    for _ in range(8):
        waits.append(m.guard.retry_s)
        m.now += m.guard.retry_s
        slow_calls += m.calls(30).count(m.busy)
    assert slow_calls == 8  # one per retry: the trial call
    assert waits == [RETRY_S * 2 ** k for k in range(6)] + [RETRY_MAX_S] * 2
    assert m.guard.threads == 1


def test_a_model_that_starts_on_a_busy_machine_still_finds_out():
    """Its every-core calls are all slow, so their fastest is slow too; the single-thread probe is the yardstick."""
    m = Machine()
    m.busy_now = True
    m.calls(40)
    assert m.guard.threads == 1


def test_one_slow_call_is_not_a_busy_machine():
    m = Machine()
    m.calls(10)
    m.guard.before("w100")
    m.guard.after("w100", 0.2)  # a page fault, a timer tick
    m.calls(30)
    assert m.guard.threads == 2


def test_one_core_or_turned_off_means_no_guard(monkeypatch):
    resized = []
    guard = ThreadGuard(1, resized.append)
    for _ in range(50):
        guard.before("w100")
        guard.after("w100", 1.0)
    assert resized == [] and guard.threads == 1
    monkeypatch.setenv(thread_guard.GUARD_ENV, "off")
    assert thread_guard.shared_guard() is None


def test_a_loaded_cpu_model_runs_under_the_guard(monkeypatch):
    """The real pool: a deployable's calls go through the shared guard, which resizes TVM's pool."""
    tvm = pytest.importorskip("tvm")
    from dyncompile.targets import get_target

    monkeypatch.delenv(thread_guard.GUARD_ENV, raising=False)
    get_target("cpu").runtime_setup()  # what `runtime.load` does before the guard is made: the pool's size
    pool_threads = tvm.get_global_func("runtime.NumThreads")
    guard = thread_guard.shared_guard()  # maybe made by an earlier test, and on one thread if the machine was busy
    assert guard is not None and int(pool_threads()) == guard.threads <= guard.cores
    if guard.cores > 1:
        threads = guard.threads
        guard._resize(1)
        assert int(pool_threads()) == 1
        guard._resize(guard.cores)
        assert int(pool_threads()) == guard.cores
        guard._resize(threads)
