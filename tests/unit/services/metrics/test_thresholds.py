"""A threshold watch: one ``crossed`` once a value stays above its limit for the hold
time, one ``recovered`` once it stays at or below it as long, nothing in between."""

from __future__ import annotations

import math

from twarga_lab.services.metrics.catalogue import Thresholds
from twarga_lab.services.metrics.thresholds import ThresholdWatch

CPU = ("vm", 7, "cpu_usage")
HOLD = 30.0


def watch() -> ThresholdWatch:
    return ThresholdWatch(Thresholds(cpu=90, memory=80, disk=95, hold_seconds=HOLD))


def feed(w: ThresholdWatch, key, values: list[tuple[float, float]]) -> list[str | None]:
    return [w.observe(key, value, at) for at, value in values]


def test_a_held_crossing_and_a_held_recovery_are_one_each():
    w = watch()
    out = feed(w, CPU, [(0, 95), (10, 99), (29, 91), (30, 92), (40, 97), (50, 50)])
    assert out == [None, None, None, "crossed", None, None]
    out = feed(w, CPU, [(60, 90), (79, 10), (80, 0), (90, 5)])  # 90 is not above 90
    assert out == [None, None, "recovered", None]


def test_a_short_spike_or_dip_resets_the_streak():
    w = watch()
    out = feed(w, CPU, [(0, 95), (20, 85), (25, 95), (50, 95), (55, 95)])
    assert out == [None, None, None, None, "crossed"]
    out = feed(w, CPU, [(60, 10), (80, 95), (85, 10), (114, 10), (115, 10)])
    assert out == [None, None, None, None, "recovered"]


def test_series_are_watched_apart_and_unlimited_metrics_are_ignored():
    w = watch()
    memory = ("vm", 7, "memory_usage")
    other_vm = ("vm", 8, "cpu_usage")
    assert feed(w, memory, [(0, 81), (30, 81)]) == [None, "crossed"]
    assert feed(w, CPU, [(0, 85), (30, 85)]) == [None, None]
    assert feed(w, other_vm, [(0, 91), (30, 91)]) == [None, "crossed"]
    assert feed(w, ("host", 0, "swap_usage"), [(0, 100), (1000, 100)]) == [None, None]
    assert w.observe(CPU, math.nan, 100) is None


def test_forgetting_a_vm_drops_its_alarms():
    w = watch()
    assert feed(w, CPU, [(0, 99), (30, 99)]) == [None, "crossed"]
    w.forget("vm", 8)
    assert feed(w, CPU, [(40, 10), (70, 10)]) == [None, "recovered"]
    assert feed(w, CPU, [(80, 99), (110, 99)]) == [None, "crossed"]
    w.forget("vm", 7)
    # A forgotten series starts with no alarm: a low value is no recovery.
    assert feed(w, CPU, [(120, 10), (150, 10)]) == [None, None]
