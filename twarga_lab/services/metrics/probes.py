"""Runtime probes of the service process: the event loop's stalls, the metrics
thread's priority, the start-up heap kept out of the garbage collector."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
from collections import deque

from twarga_lab.services.background import cancel_and_wait

_heap_frozen = False
# Nice value of the metrics thread: when the CPUs are busy, the event loop thread (nice 0)
# is scheduled first, so the collector delays requests as little as possible.
METRICS_THREAD_NICE = 10


def background_priority() -> None:
    # Linux schedules threads as tasks: a thread id lowers the priority of this thread only.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), METRICS_THREAD_NICE)


def freeze_startup_heap() -> None:
    """Move the objects alive at start-up (modules, classes, the server) out of the garbage
    collector's reach, once per process.

    A full collection walks every tracked object while holding the GIL: ~250k objects
    after start-up take 200+ ms here, a stall of the event loop that the collector's
    allocations would otherwise trigger now and then. Those objects live as long as the
    process anyway; everything created later is still collected as usual.
    """
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.freeze()


# -- the event loop's stalls -------------------------------------------------------------


class LoopLagProbe:
    """A task that sleeps ``interval`` and measures how late it wakes: the longest stall
    of the event loop that any request could have suffered."""

    def __init__(self, interval: float = 0.02, window: float = 60.0) -> None:
        self.interval = interval
        self.window = window
        self.max_since_reset = 0.0
        self._recent: deque[tuple[float, float]] = deque()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.record(max(0.0, loop.time() - expected), loop.time())

    def record(self, lag: float, at: float) -> None:
        self.max_since_reset = max(self.max_since_reset, lag)
        # Keep only lags that could still be the window's maximum.
        while self._recent and self._recent[-1][1] <= lag:
            self._recent.pop()
        self._recent.append((at, lag))
        while self._recent and self._recent[0][0] < at - self.window:
            self._recent.popleft()

    def max_stall(self) -> float:
        """The longest stall of the last ``window`` seconds, in seconds."""
        return self._recent[0][1] if self._recent else 0.0

    def reset(self) -> None:
        self.max_since_reset = 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
