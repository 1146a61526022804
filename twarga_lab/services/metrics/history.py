"""History queries: reading and shaping the points of a checked ``GET /metrics/history``
(``schemas.metrics.HistoryQuery`` parses the request)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from twarga_lab.services.metric_store import (
    HOUR,
    MINUTE,
    RAW,
    RESOLUTION_NAMES,
    MetricStore,
    Retention,
)
from twarga_lab.services.metrics.catalogue import METRICS, iso

if TYPE_CHECKING:  # the schema imports the metric catalogue, which is this package
    from twarga_lab.schemas.metrics import HistoryQuery

# Without a step, a window is read at the resolution that gives about this many points.
TARGET_POINTS = 1000
NATURAL_STEP = {MINUTE: 60.0, HOUR: 3600.0}


def choose_resolution(query: HistoryQuery, now: float, retention: Retention) -> int:
    """The coarsest tier at least as fine as the step (or ~1000 points without one), made
    coarser while the finer tier no longer holds the window's start."""
    step = query.step or (query.until - query.since) / TARGET_POINTS
    resolution = RAW if step < MINUTE else MINUTE if step < HOUR else HOUR
    while resolution != HOUR and query.since < now - retention.of(resolution):
        resolution = MINUTE if resolution == RAW else HOUR
    return resolution


def downsample(ts: np.ndarray, values: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Averages over ``step``-second buckets (aligned to the Unix epoch)."""
    if len(ts) == 0:
        return ts, values
    buckets = np.floor_divide(ts, step) * step
    keys, inverse = np.unique(buckets, return_inverse=True)
    sums = np.bincount(inverse, weights=values.astype(np.float64))
    counts = np.bincount(inverse)
    return keys, sums / counts


def read_history(
    store: MetricStore, query: HistoryQuery, now: float, retention: Retention, interval: float
) -> dict[str, Any]:
    """The points of one metric of the host or one VM in a window (``interval``: the
    collector's, the spacing of raw samples).

    ``network`` (the seed's name) reads both directions: ``series`` has each, and
    ``points`` their sum."""
    resolution = choose_resolution(query, now, retention)
    series = {
        name: series_points(store, query, name, resolution, interval)
        for name in query.series_names()
    }
    body: dict[str, Any] = {
        "entity": query.entity,
        "id": query.entity_id,
        "metric": query.metric,
        "unit": METRICS[query.entity][query.series_names()[0]],
        "resolution": RESOLUTION_NAMES[resolution],
        "step": query.step,
        "since": iso(query.since),
        "until": iso(query.until),
    }
    if len(series) == 1:
        body["points"] = next(iter(series.values()))
        return body
    totals: dict[str, float] = {}
    for points in series.values():
        for stamp, value in points:
            totals[stamp] = round(totals.get(stamp, 0.0) + value, 3)
    body["points"] = [[stamp, totals[stamp]] for stamp in sorted(totals)]
    body["series"] = series
    return body


def series_points(
    store: MetricStore, query: HistoryQuery, metric: str, resolution: int, interval: float
) -> list[list[Any]]:
    """``[[iso time, value], ...]`` of one stored series, downsampled to the step."""
    points = store.query(
        (query.entity, query.entity_id or 0, metric), resolution, query.since, query.until
    )
    ts, values = points.ts, points.avg
    natural = NATURAL_STEP.get(resolution, interval)
    if query.step is not None and query.step > natural:
        ts, values = downsample(ts, values, query.step)
    stamps = np.datetime_as_string(
        np.rint(ts * 1000).astype(np.int64).astype("datetime64[ms]"), unit="s"
    )
    rounded = np.round(values.astype(np.float64), 3).tolist()
    return [[f"{s}+00:00", v] for s, v in zip(stamps.tolist(), rounded, strict=True)]
