"""The metric store: packed chunks, rollups, restart recovery and pruning, on a patched
clock and a real SQLite database."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select

from twarga_lab.db import Database
from twarga_lab.db.models import MetricChunk
from twarga_lab.services import metric_store
from twarga_lab.services.metric_store import (
    HOUR,
    MINUTE,
    RAW,
    SPAN,
    MetricStore,
    Retention,
    decode_chunk,
    encode_chunk,
)

T0 = 1_800_000_000 - 1_800_000_000 % 86400  # a midnight UTC
CPU = ("vm", 7, "cpu_usage")
MEM = ("host", 0, "memory_usage")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock(T0)
    monkeypatch.setattr(metric_store, "clock", fake)
    return fake


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'metrics.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    database = Database(url).open()
    yield database
    database.dispose()


def feed(store: MetricStore, clock: Clock, start: float, seconds: float, step: float = 10.0):
    """CPU ramps 0, 1, 2 ... per sample; memory is always 50."""
    t, i = start, 0
    while t < start + seconds:
        clock.now = t
        store.add(t, {CPU: float(i % 100), MEM: 50.0})
        store.flush()
        t += step
        i += 1


def chunk_rows(db: Database) -> dict[int, int]:
    with db.engine.connect() as conn:
        return dict(
            conn.execute(
                select(MetricChunk.resolution, func.count()).group_by(MetricChunk.resolution)
            ).all()
        )


def test_a_chunk_round_trips_its_timestamps_and_values():
    ts = T0 + np.array([0.0, 10.0, 20.004, 599.999])
    values = np.array([[1.5, -2.0, 3.25, 1e9]], dtype=np.float32)
    data = encode_chunk(T0, ts, values)
    back_ts, back_values = decode_chunk(T0, 4, data)
    assert np.allclose(back_ts, ts, atol=0.001)
    assert np.array_equal(back_values, values)


def test_a_steady_series_packs_to_a_few_bytes_per_sample():
    ts = T0 + np.arange(120) * 5.0
    values = np.linspace(0, 100, 120, dtype=np.float32).reshape(1, -1)
    assert len(encode_chunk(T0, ts, values)) < 120 * 6


def test_rollups_of_three_hours(db, clock):
    store = MetricStore(db).open()
    feed(store, clock, T0, 3 * 3600)
    clock.now = T0 + 3 * 3600 + 1
    store.flush()

    minutes = store.query(CPU, MINUTE, T0, T0 + 3600 - 1)
    assert len(minutes.ts) == 60
    # Minute 0 holds samples 0..5: average 2.5, min 0, max 5.
    assert minutes.ts[0] == T0
    assert (minutes.avg[0], minutes.min[0], minutes.max[0]) == (2.5, 0.0, 5.0)
    hours = store.query(MEM, HOUR, T0, T0 + 3 * 3600)
    assert hours.ts.tolist() == [T0, T0 + 3600, T0 + 7200]
    assert hours.avg.tolist() == [50.0, 50.0, 50.0]
    raw = store.query(CPU, RAW, T0, T0 + 3 * 3600)
    assert len(raw.ts) == 3 * 360
    assert raw.avg[:3].tolist() == [0.0, 1.0, 2.0]
    # Raw chunks every 10 minutes, minute chunks every hour; the day is still open.
    rows = chunk_rows(db)
    assert rows[RAW] == 2 * 18 and rows[MINUTE] == 2 * 3 and HOUR not in rows


def test_open_buckets_are_read_from_memory(db, clock):
    store = MetricStore(db).open()
    feed(store, clock, T0, 90)
    assert chunk_rows(db) == {}
    assert len(store.query(CPU, RAW, T0, T0 + 90).ts) == 9
    assert store.query(CPU, MINUTE, T0, T0 + 90).ts.tolist() == [T0, T0 + 60]
    assert store.query(CPU, HOUR, T0, T0 + 90).avg.tolist() == [4.0]


def test_a_restart_loses_nothing_and_a_crash_loses_no_rollup(db, clock):
    store = MetricStore(db).open()
    feed(store, clock, T0, 1800 + 120)  # into the middle of a raw bucket
    store.flush(final=True)  # a clean shutdown writes the open buckets

    restarted = MetricStore(db).open()
    feed(restarted, clock, T0 + 1920, 3600)
    clock.now = T0 + 2 * 3600
    restarted.flush()
    raw = restarted.query(CPU, RAW, T0, T0 + 2 * 3600)
    assert len(raw.ts) == (1920 + 3600) // 10
    assert len(restarted.query(CPU, MINUTE, T0, T0 + 3600 - 1).ts) == 60

    # A crash: samples buffered since the last closed raw bucket are gone, but the
    # rollups of what reached the database are rebuilt at start.
    feed(restarted, clock, T0 + 2 * 3600, 1500)
    crashed = MetricStore(db).open()
    minutes = crashed.query(CPU, MINUTE, T0 + 2 * 3600, T0 + 3 * 3600)
    assert len(minutes.ts) == 20  # the two raw buckets that closed before the crash
    clock.now = T0 + 4 * 3600
    crashed.flush()
    assert len(crashed.query(CPU, MINUTE, T0 + 2 * 3600, T0 + 3 * 3600).ts) == 20


def test_pruning_keeps_each_tier_for_its_retention(db, clock):
    retention = Retention(raw=3600, minute=2 * 3600, hour=86400)
    store = MetricStore(db, retention).open()
    feed(store, clock, T0, 5 * 3600, step=30)
    clock.now = T0 + 5 * 3600
    store.flush()
    before = chunk_rows(db)

    deleted = store.prune()
    after = chunk_rows(db)
    assert deleted == sum(before.values()) - sum(after.values()) > 0
    oldest_raw = store.query(CPU, RAW, T0, clock.now).ts.min()
    assert oldest_raw >= clock.now - 3600 - SPAN[RAW]
    oldest_minute = store.query(CPU, MINUTE, T0, clock.now).ts.min()
    assert oldest_minute >= clock.now - 2 * 3600 - SPAN[MINUTE]
    assert store.query(CPU, HOUR, T0, clock.now).ts.min() == T0  # kept a day
    assert store.prune() == 0  # nothing more until time passes

    clock.now += 86400 + SPAN[HOUR]
    store.flush()
    store.prune()
    assert chunk_rows(db) == {}


def test_a_series_that_stops_closes_its_buckets(db, clock):
    store = MetricStore(db).open()
    feed(store, clock, T0, 300)
    clock.now = T0 + SPAN[MINUTE] + 1
    assert store.flush() >= 2  # raw and minute chunks without a newer sample
    assert len(store.query(CPU, RAW, T0, T0 + 300).ts) == 30
