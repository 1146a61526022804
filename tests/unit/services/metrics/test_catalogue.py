"""What the metrics catalogue promises: every seed name maps to stored series, units
follow the names, the thresholds cover the percentages, and timestamps read as ISO 8601
UTC."""

from __future__ import annotations

import time

from twarga_lab.services.metrics import catalogue
from twarga_lab.services.metrics.catalogue import (
    HOST_METRICS,
    METRICS,
    SEED_METRICS,
    THRESHOLD_LABELS,
    VM_METRICS,
    Thresholds,
    clock,
    iso,
)


def test_seed_names_read_stored_series_of_both_entities():
    for name, series in SEED_METRICS.items():
        assert series, name
        for stored in series:
            assert stored in HOST_METRICS and stored in VM_METRICS
    assert SEED_METRICS["network"] == ("net_sent_bytes_per_s", "net_recv_bytes_per_s")
    assert set(METRICS) == {"host", "vm"}
    assert set(HOST_METRICS) - set(VM_METRICS) == {"swap_usage"}


def test_units_are_percent_or_bytes_per_second():
    for metrics in METRICS.values():
        for name, unit in metrics.items():
            assert unit == ("%" if name.endswith("_usage") else "B/s"), name


def test_thresholds_limit_the_labelled_percentages_only():
    thresholds = Thresholds(cpu=80, memory=70, disk=60, hold_seconds=5)
    assert {m: thresholds.limit(m) for m in THRESHOLD_LABELS} == {
        "cpu_usage": 80,
        "memory_usage": 70,
        "disk_usage": 60,
    }
    assert thresholds.limit("swap_usage") is None
    assert thresholds.limit("net_sent_bytes_per_s") is None


def test_iso_is_utc_and_clock_is_now():
    assert iso(0) == "1970-01-01T00:00:00+00:00"
    assert iso(1_800_000_000.5) == "2027-01-15T08:00:00.500000+00:00"
    before = time.time()
    assert before <= clock() <= time.time()
    assert catalogue.clock is clock
