"""On a busy CPU, TVM's thread pool can make every call hundreds of times slower: watch calls, fall back to one
thread while that happens, and go back to every core when it stops.

TVM splits each kernel statically between its threads and waits for all of them. When every core also runs
another process, a worker the OS has descheduled stalls each kernel for a scheduler time slice: ResNet-20
sub-nets that take 0.07–0.31 ms on an idle 2-core machine took 100–130 ms with two busy processes beside them,
while one thread took 0.1–0.6 ms (RESULTS.md, "Issue 11, fourth session"). One thread is up to 1.8× slower on an
idle machine, so it is the fallback, not the default. The policy, per loaded model and sub-net:

- a call is *slow* when it takes over `SLOW_FACTOR` × the fastest call of that sub-net seen so far (any thread
  count) and over `SLOW_MIN_S`;
- with every core, `STRIKES` slow calls among the last `WINDOW` switch the process to one thread;
- with one thread, after `retry_s` the next call runs on every core again; if it is slow, back to one thread
  and the wait doubles (up to `RETRY_MAX_S`), so a machine that stays busy pays one slow call a minute;
- the first calls of a sub-net include one on a single thread, so "fastest seen" is known even if the model
  starts on an already busy machine.

The thread count is TVM's process-wide pool, so there is one guard per process (`shared_guard`). Turn it off
with `DYNCOMPILE_THREAD_GUARD=off` (then TVM's own settings apply, `TVM_NUM_THREADS` included).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable

__all__ = ["ThreadGuard", "shared_guard", "GUARD_ENV", "SLOW_FACTOR", "SLOW_MIN_S", "STRIKES", "WINDOW",
           "RETRY_S", "RETRY_MAX_S"]

GUARD_ENV = "DYNCOMPILE_THREAD_GUARD"
SLOW_FACTOR = 8.0  # a call this many times its sub-net's fastest is slow...
SLOW_MIN_S = 0.002  # ...and takes longer than this (a page fault or a timer tick is not a busy machine)
STRIKES = 3  # slow calls among the last WINDOW that mean the cores are taken
WINDOW = 20
RETRY_S = 2.0  # first wait before every core is tried again; doubles while the machine stays busy
RETRY_MAX_S = 64.0
PROBE_AFTER_CALLS = 3  # a sub-net's calls on every core before one runs on a single thread


class ThreadGuard:
    """The policy (module docstring), apart from TVM: `set_threads(n)` resizes the pool, `clock()` is the time."""

    def __init__(self, cores: int, set_threads: Callable[[int], None], clock: Callable[[], float] = time.monotonic):
        self.cores = cores
        self.threads = cores
        self._set_threads = set_threads
        self._clock = clock
        self._fastest: dict[object, float] = {}
        self._calls_on_all: dict[object, int] = {}
        self._probed: set[object] = set()
        self._recent: deque[bool] = deque(maxlen=WINDOW)  # slow or not, calls on every core
        self.retry_s = RETRY_S
        self._retry_at = 0.0
        self._trial = False  # the call about to finish is the first on every core after one-thread calls
        self.switches = 0  # how often the pool was resized (`threads` says where it is now)

    def before(self, key: object) -> None:
        """Called before each call of sub-net `key`: the thread count it should run with."""
        if self.cores <= 1:
            return
        if self.threads == 1 and self._clock() >= self._retry_at:
            self._resize(self.cores)  # try every core again, for this call
            self._trial = True
        elif (self.threads == self.cores and key not in self._probed
              and self._calls_on_all.get(key, 0) >= PROBE_AFTER_CALLS):
            self._probed.add(key)
            self._resize(1)  # one call on a single thread: a fastest time an already busy machine cannot spoil
            self._retry_at = self._clock()

    def after(self, key: object, seconds: float) -> None:
        """Called after each call of sub-net `key` with its wall time."""
        if self.cores <= 1:
            return
        fastest = self._fastest.get(key)
        slow = fastest is not None and seconds > max(SLOW_FACTOR * fastest, SLOW_MIN_S)
        self._fastest[key] = seconds if fastest is None else min(fastest, seconds)
        if self.threads == 1:
            return
        self._calls_on_all[key] = self._calls_on_all.get(key, 0) + 1
        trial, self._trial = self._trial, False
        self._recent.append(slow)
        if slow and trial:  # the first call back on every core was slow: the machine is still busy
            self.retry_s = min(2 * self.retry_s, RETRY_MAX_S)
            self._fall_back()
        elif sum(self._recent) >= STRIKES:
            self._fall_back()
        elif trial:
            self.retry_s = RETRY_S

    def _fall_back(self) -> None:
        self._resize(1)
        self._retry_at = self._clock() + self.retry_s

    def _resize(self, threads: int) -> None:
        if threads != self.threads:
            self._set_threads(threads)
            self.threads = threads
            self.switches += 1
        self._recent.clear()


_shared: ThreadGuard | None = None


def shared_guard() -> ThreadGuard | None:
    """The process's guard over TVM's CPU pool (created on first use), or None when turned off."""
    global _shared
    if os.environ.get(GUARD_ENV, "").lower() in ("0", "off", "false", "no"):
        return None
    if _shared is None:
        import tvm

        configure = tvm.get_global_func("runtime.config_threadpool")
        from dyncompile.targets.llvm_common import THREADS_ENV

        # the count `runtime.load` asked for (targets' runtime_setup sets TVM_NUM_THREADS), else the pool's own
        cores = int(os.environ.get(THREADS_ENV) or tvm.get_global_func("runtime.NumThreads")())
        # mode 1 (TVM's kBig, what the pool starts with): every core, threads bound as TVM_BIND_THREADS says
        configure(1, cores)  # the pool may have started before TVM_NUM_THREADS was set: now it has `cores`
        _shared = ThreadGuard(cores, lambda n: configure(1, n))
    return _shared
