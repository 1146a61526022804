"""The loop-lag probe keeps the longest stall of its window and since the last reset;
the metrics thread's priority is lowered for that thread only."""

from __future__ import annotations

import asyncio
import os
import threading
import time

from twarga_lab.services.metrics import probes
from twarga_lab.services.metrics.probes import (
    METRICS_THREAD_NICE,
    LoopLagProbe,
    background_priority,
)


def test_the_window_maximum_follows_recorded_lags():
    probe = LoopLagProbe(window=10.0)
    assert probe.max_stall() == 0.0
    probe.record(0.5, at=100.0)
    probe.record(0.1, at=101.0)
    probe.record(0.3, at=105.0)
    assert probe.max_stall() == 0.5
    probe.record(0.05, at=110.5)  # 0.5 (at 100) has left the window
    assert probe.max_stall() == 0.3
    probe.record(0.0, at=116.0)  # so have 0.1 and 0.3
    assert probe.max_stall() == 0.05
    assert probe.max_since_reset == 0.5
    probe.reset()
    assert probe.max_since_reset == 0.0 and probe.max_stall() == 0.05
    probe.record(0.2, at=117.0)
    assert probe.max_since_reset == 0.2 and probe.max_stall() == 0.2


async def test_a_started_probe_measures_a_blocked_loop_and_stops():
    probe = LoopLagProbe(interval=0.01)
    probe.start()
    probe.start()  # once only
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # block the loop
        deadline = time.monotonic() + 5
        while probe.max_stall() < 0.2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert probe.max_stall() >= 0.2
    finally:
        await probe.stop()
    assert probe._task is None
    await probe.stop()  # stopping twice is fine


def test_background_priority_lowers_this_thread_only():
    seen: dict[str, int] = {}

    def worker() -> None:
        before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        background_priority()
        seen["before"] = before
        seen["after"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert seen["after"] == max(seen["before"], METRICS_THREAD_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


def test_the_startup_heap_is_frozen_once(monkeypatch):
    calls = []
    monkeypatch.setattr(probes, "_heap_frozen", False)
    monkeypatch.setattr(probes.gc, "freeze", lambda: calls.append(1))
    probes.freeze_startup_heap()
    probes.freeze_startup_heap()
    assert calls == [1]
