"""History reads of checked requests (``schemas.metrics.HistoryQuery``): the resolution
chosen for a window, step averaging, the points' shape, and ``network`` as the sum of both
directions, from a real metric store on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from twarga_lab.db import Database
from twarga_lab.schemas.metrics import HistoryQuery
from twarga_lab.services.metric_store import HOUR, MINUTE, RAW, MetricStore, Retention
from twarga_lab.services.metrics.history import choose_resolution, downsample, read_history


def history_query(entity, entity_id, metric, since, until, step=None, series=()) -> HistoryQuery:
    """A checked history request, as the handler passes it on."""
    return HistoryQuery(
        entity=entity,
        entity_id=entity_id,
        metric=metric,
        since=since,
        until=until,
        step=step,
        series=series,
    )


T0 = 1_800_000_000 - 1_800_000_000 % 86400  # a midnight UTC
RETENTION = Retention(raw=3600.0, minute=86400.0, hour=30 * 86400.0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetricStore]:
    db = Database(f"sqlite:///{tmp_path / 'history.db'}").open()
    store = MetricStore(db, RETENTION).open(now=T0)
    for i in range(60):  # ten minutes, every 10 s
        store.add(
            T0 + 10 * i,
            {
                ("vm", 7, "cpu_usage"): float(i),
                ("vm", 7, "net_sent_bytes_per_s"): 100.0,
                ("vm", 7, "net_recv_bytes_per_s"): 0.5 * i,
                ("vm", 8, "cpu_usage"): 99.0,
            },
        )
    yield store
    db.dispose()


@pytest.mark.parametrize(
    ("window", "step", "age", "resolution"),
    [
        (600, None, 0, RAW),  # ~1000 points of a short window: raw
        (20 * 3600, None, 0, MINUTE),  # 72 s per point: minutes
        (86400, 3600, 0, HOUR),
        (600, 30, 2 * 3600, MINUTE),  # raw no longer holds the window's start
        (600, None, 2 * 86400, HOUR),  # nor do minutes
    ],
)
def test_the_resolution_follows_the_step_and_the_retention(window, step, age, resolution):
    now = T0 + 10 * 86400
    query = history_query("host", None, "cpu_usage", now - age - window, now - age, step)
    assert choose_resolution(query, now, RETENTION) == resolution


def test_downsampling_averages_epoch_aligned_buckets():
    ts = np.array([0.0, 10.0, 20.0, 30.0, 65.0])
    values = np.array([1.0, 2.0, 3.0, 5.0, 7.0], dtype=np.float32)
    keys, means = downsample(ts, values, 30.0)
    assert keys.tolist() == [0.0, 30.0, 60.0]
    assert means.tolist() == [2.0, 5.0, 7.0]
    empty = np.empty(0)
    assert downsample(empty, empty, 30.0)[0].size == 0


def test_raw_points_of_one_vm_in_the_window(store):
    query = history_query("vm", 7, "cpu_usage", T0 + 100, T0 + 150)
    body = read_history(store, query, T0 + 600, RETENTION, 10.0)
    assert body == {
        "entity": "vm",
        "id": 7,
        "metric": "cpu_usage",
        "unit": "%",
        "resolution": "raw",
        "step": None,
        "since": "2027-01-15T00:01:40+00:00",
        "until": "2027-01-15T00:02:30+00:00",
        "points": [
            ["2027-01-15T00:01:40+00:00", 10.0],
            ["2027-01-15T00:01:50+00:00", 11.0],
            ["2027-01-15T00:02:00+00:00", 12.0],
            ["2027-01-15T00:02:10+00:00", 13.0],
            ["2027-01-15T00:02:20+00:00", 14.0],
            ["2027-01-15T00:02:30+00:00", 15.0],
        ],
    }


def test_a_step_above_the_interval_averages_the_points(store):
    query = history_query("vm", 7, "cpu_usage", T0, T0 + 119, step=30.0)
    body = read_history(store, query, T0 + 600, RETENTION, 10.0)
    assert body["resolution"] == "raw" and body["step"] == 30.0
    assert [value for _, value in body["points"]] == [1.0, 4.0, 7.0, 10.0]


def test_network_is_both_directions_and_their_sum(store):
    query = history_query(
        "vm",
        7,
        "network",
        T0,
        T0 + 20,
        series=("net_sent_bytes_per_s", "net_recv_bytes_per_s"),
    )
    body = read_history(store, query, T0 + 600, RETENTION, 10.0)
    assert body["metric"] == "network" and body["unit"] == "B/s"
    assert [v for _, v in body["series"]["net_sent_bytes_per_s"]] == [100.0, 100.0, 100.0]
    assert [v for _, v in body["series"]["net_recv_bytes_per_s"]] == [0.0, 0.5, 1.0]
    assert [v for _, v in body["points"]] == [100.0, 100.5, 101.0]


def test_an_unknown_vm_has_no_points(store):
    query = history_query("vm", 9, "cpu_usage", T0, T0 + 600)
    body = read_history(store, query, T0 + 600, RETENTION, 10.0)
    assert body["points"] == []
