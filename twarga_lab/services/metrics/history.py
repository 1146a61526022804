"""History queries: checking ``GET /metrics/history`` and shaping its points."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from twarga_lab.errors import InvalidRequest, ValidationFailed
from twarga_lab.services.metric_store import (
    HOUR,
    MINUTE,
    RAW,
    RESOLUTION_NAMES,
    MetricStore,
    Retention,
)
from twarga_lab.services.metrics.catalogue import METRICS, SEED_METRICS, MetricsConfig, iso

# Without a step, a window is read at the resolution that gives about this many points.
TARGET_POINTS = 1000
# One request may ask for at most this many points (window / step): a 90-day window with
# a 1-second step would otherwise be a request to shape millions of buckets.
MAX_POINTS = 20_000
NATURAL_STEP = {MINUTE: 60.0, HOUR: 3600.0}
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# -- history queries ---------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryQuery:
    """A checked ``GET /metrics/history`` request."""

    entity: str
    entity_id: int | None
    metric: str
    since: float
    until: float
    step: float | None
    # The stored series the metric reads: itself, or both directions for ``network``.
    series: tuple[str, ...] = ()

    def series_names(self) -> tuple[str, ...]:
        """The stored metrics this query reads."""
        return self.series or (self.metric,)


def parse_time(value: str, name: str, now: float) -> float:
    """ISO 8601 (naive means UTC), Unix seconds, ``now`` or ``-30m`` / ``-6h`` / ``-7d``."""
    text = value.strip()
    if text == "now":
        return now
    relative = _RELATIVE.fullmatch(text)
    if relative:
        return now - float(relative.group(1)) * _UNITS[relative.group(2)]
    with contextlib.suppress(ValueError):
        number = float(text)
        if math.isfinite(number):
            # A bare negative number is seconds before now (``since=-300``), not 1969.
            return now + number if number < 0 else number
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(
            f"{name!r} must be an ISO 8601 time, Unix seconds, 'now' or like '-6h'",
            "bad_type",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_history_query(
    args: Mapping[str, str | None], now: float, max_window: float
) -> HistoryQuery:
    """Check the query arguments: 400 for a missing or malformed one, 422 for a value out
    of bounds (with its ``field``)."""
    entity = args.get("entity") or ("vm" if args.get("vm_id") else None)
    if not entity:
        raise InvalidRequest("'entity' is required (host or vm)", "missing_field")
    if entity not in METRICS:
        raise ValidationFailed("entity must be 'host' or 'vm'", field="entity", reason="bad_entity")
    entity_id: int | None = None
    if entity == "vm":
        raw_id = args.get("id") or args.get("vm_id")
        if not raw_id:
            raise InvalidRequest("'id' is required for entity=vm", "missing_field")
        if not raw_id.isdigit():
            raise InvalidRequest("'id' must be an integer", "bad_type")
        entity_id = int(raw_id)
    metric = args.get("metric") or args.get("metric_type")
    if not metric:
        raise InvalidRequest("'metric' is required", "missing_field")
    series = SEED_METRICS.get(metric, ())
    if metric not in METRICS[entity] and not series:
        names = [*METRICS[entity], *SEED_METRICS]
        raise ValidationFailed(
            f"metric must be one of {', '.join(names)} for entity={entity}",
            field="metric",
            reason="unknown_metric",
        )
    until = parse_time(args.get("until") or "now", "until", now)
    since = parse_time(args.get("since") or "-1h", "since", now)
    hours = args.get("hours")
    if hours:
        if args.get("since"):
            raise ValidationFailed(
                "send either 'hours' or 'since', not both",
                field="hours",
                reason="conflicting_fields",
            )
        try:
            span = float(hours) * 3600
        except ValueError:
            raise InvalidRequest("'hours' must be a number", "bad_type") from None
        if not math.isfinite(span) or span <= 0:
            raise ValidationFailed("hours must be positive", field="hours", reason="bad_window")
        since = until - span
    if since >= until:
        raise ValidationFailed("since must be before until", field="since", reason="bad_window")
    if until - since > max_window:
        raise ValidationFailed(
            f"the window may be at most {max_window / 86400:g} days",
            field="since",
            reason="window_too_long",
        )
    step: float | None = None
    raw_step = args.get("step")
    if raw_step:
        try:
            step = float(raw_step)
        except ValueError:
            raise InvalidRequest("'step' must be a number of seconds", "bad_type") from None
        if not math.isfinite(step) or step < 1 or step > until - since:
            raise ValidationFailed(
                "step must be at least 1 second and at most the window",
                field="step",
                reason="bad_step",
            )
        if (until - since) / step > MAX_POINTS:
            raise ValidationFailed(
                f"window / step may give at most {MAX_POINTS} points; use a larger step",
                field="step",
                reason="too_many_points",
            )
    # Seed names map to ours; ``network`` keeps its name and reads both directions.
    if series and len(series) == 1:
        metric, series = series[0], ()
    return HistoryQuery(entity, entity_id, metric, since, until, step, series)


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
    store: MetricStore, query: HistoryQuery, now: float, config: MetricsConfig
) -> dict[str, Any]:
    """The points of one metric of the host or one VM in a window.

    ``network`` (the seed's name) reads both directions: ``series`` has each, and
    ``points`` their sum."""
    resolution = choose_resolution(query, now, config.retention)
    series = {
        name: series_points(store, query, name, resolution, config.interval)
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
