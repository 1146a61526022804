"""Metric storage designed for the reads people make: a window of one metric of one VM (or
of the host) at raw, 1-minute or 1-hour resolution.

Samples are buffered in memory per series and written as *chunk* rows: one row per series,
resolution and time bucket, holding zlib-packed millisecond offsets and float32 columns.

- raw samples: 10-minute buckets, written when the bucket closes (a 24-hour read is
  ~145 rows; a crash loses at most the open 10 minutes);
- 1-minute rollups (avg, min, max, count): 1-hour buckets, computed from each closed raw
  bucket with numpy;
- 1-hour rollups: 1-day buckets, computed from each closed 1-minute bucket.

Open buckets are kept in memory and merged into every read; at shutdown they are written
as partial rows, and at start the open raw bucket is read back and the rollups of the
open hour and day are rebuilt from the finer tier, so a restart (or a crash) leaves no
hole in the rollups. Every write is an upsert on (series, resolution, start), which
makes rewriting a partial row harmless on SQLite and PostgreSQL alike.

No tornado, no asyncio: callers run these methods in worker threads; one lock guards the
in-memory state.

Why it is long: writing and reading the chunk format (packing, buckets, rollups, restart
recovery) must agree byte for byte, so both halves stay side by side.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import Connection, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from twarga_lab.db import Database
from twarga_lab.db.models import MetricChunk, MetricSeries

log = logging.getLogger(__name__)

RAW = 0
MINUTE = 60
HOUR = 3600
RESOLUTIONS = (RAW, MINUTE, HOUR)
RESOLUTION_NAMES = {RAW: "raw", MINUTE: "1m", HOUR: "1h"}
# Bucket length of each tier's chunk rows, in seconds. Each divides the next, so every
# finer bucket falls in exactly one coarser bucket.
SPAN = {RAW: 600, MINUTE: 3600, HOUR: 86400}
# float32 columns per tier: raw holds the value; rollups hold avg, min, max and count.
ROLLUP_COLUMNS = 4

SeriesKey = tuple[str, int, str]  # (entity, entity_id, metric); the host is ("host", 0, ...)


# Rows per executemany: each batch's parameter handling holds the GIL a few milliseconds.
UPSERT_BATCH = 200
# Work in a worker thread hands the GIL over at least this often (seconds), so the event
# loop thread never waits the interpreter's 5 ms switch interval more than once.
GIL_SLICE = 0.002


def yield_gil_every(slice_seconds: float = GIL_SLICE) -> Callable[[], None]:
    """A function to call between pieces of long work: after ``slice_seconds`` of it, it
    sleeps a moment, which releases the GIL to a waiting thread (a bare ``sleep(0)`` may
    take it straight back)."""
    last = time.perf_counter()

    def pace() -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= slice_seconds:
            time.sleep(0.0001)
            last = time.perf_counter()

    return pace


def clock() -> float:
    """Now, in Unix seconds. Module level so tests can patch the store's clock."""
    return time.time()


@dataclass(frozen=True)
class Retention:
    """How long each tier is kept, in seconds."""

    raw: float = 24 * 3600.0
    minute: float = 7 * 86400.0
    hour: float = 90 * 86400.0

    def of(self, resolution: int) -> float:
        return {RAW: self.raw, MINUTE: self.minute, HOUR: self.hour}[resolution]


class Points(NamedTuple):
    """A series' points in a window: Unix seconds and the average (raw: the value), with
    the minimum and maximum of each rollup point (raw: the value again)."""

    ts: np.ndarray
    avg: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @staticmethod
    def empty() -> Points:
        nothing = np.empty(0, dtype=np.float64)
        return Points(nothing, nothing, nothing, nothing)


# -- codec -------------------------------------------------------------------------------


def encode_chunk(start: int, ts: np.ndarray, columns: np.ndarray) -> bytes:
    """Pack timestamps (Unix seconds, sorted) and a (k, n) float array for bucket ``start``.

    Timestamps become millisecond offsets from ``start``, delta-encoded so that a steady
    interval compresses to almost nothing; values are little-endian float32.
    """
    offsets = np.rint((np.asarray(ts, dtype=np.float64) - start) * 1000.0).astype(np.int64)
    deltas = np.empty(len(offsets), dtype="<u4")
    if len(offsets):
        deltas[0] = offsets[0]
        deltas[1:] = offsets[1:] - offsets[:-1]
    payload = deltas.tobytes() + np.ascontiguousarray(columns, dtype="<f4").tobytes()
    return zlib.compress(payload, 1)


def decode_chunk(start: int, count: int, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The timestamps (float64 Unix seconds) and the (k, n) float32 columns of a chunk."""
    payload = zlib.decompress(data)
    deltas = np.frombuffer(payload, dtype="<u4", count=count)
    ts = np.cumsum(deltas, dtype=np.int64) / 1000.0 + start
    columns = np.frombuffer(payload, dtype="<f4", offset=4 * count)
    return ts, columns.reshape(-1, count)


# -- rollups -----------------------------------------------------------------------------


def rollup(ts: np.ndarray, columns: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Points of ``step`` seconds from finer points.

    ``columns`` is either one row of raw values or the four rollup rows (avg, min, max,
    count); the result is always the four rollup rows, averages weighted by count.
    """
    if len(ts) == 0:
        return np.empty(0), np.empty((ROLLUP_COLUMNS, 0), dtype=np.float32)
    buckets = (np.floor_divide(ts, step) * step).astype(np.int64)
    # ts is sorted, so each bucket is one run: reduceat over the run starts.
    starts = np.concatenate(([0], np.flatnonzero(buckets[1:] != buckets[:-1]) + 1))
    if columns.shape[0] == 1:
        values = columns[0].astype(np.float64)
        avg_in, min_in, max_in = values, values, values
        count_in = np.ones_like(values)
    else:
        avg_in = columns[0].astype(np.float64)
        min_in, max_in = columns[1], columns[2]
        count_in = columns[3].astype(np.float64)
    counts = np.add.reduceat(count_in, starts)
    sums = np.add.reduceat(avg_in * count_in, starts)
    out = np.vstack(
        [
            sums / np.maximum(counts, 1),
            np.minimum.reduceat(min_in, starts),
            np.maximum.reduceat(max_in, starts),
            counts,
        ]
    ).astype(np.float32)
    return buckets[starts].astype(np.float64), out


# -- in-memory buffers -------------------------------------------------------------------


class _RawBuffer:
    """The open raw bucket of one series."""

    __slots__ = ("start", "ts", "values")

    def __init__(self, start: int) -> None:
        self.start = start
        self.ts = array("d")
        self.values = array("d")

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        ts = np.frombuffer(self.ts, dtype=np.float64).copy()
        values = np.frombuffer(self.values, dtype=np.float64).astype(np.float32)
        order = np.argsort(ts, kind="stable")
        return ts[order], values[order].reshape(1, -1)


class _RollupBuffer:
    """The open bucket of one rollup tier of one series. A point merged again (recomputed
    after a restart) replaces the one read back. Plain arrays, not Python objects per point:
    nothing here for the garbage collector to walk."""

    __slots__ = ("columns", "start", "ts")

    def __init__(self, start: int) -> None:
        self.start = start
        self.ts = np.empty(0)
        self.columns = np.empty((ROLLUP_COLUMNS, 0), dtype=np.float32)

    def merge(self, ts: np.ndarray, columns: np.ndarray) -> None:
        if not len(self.ts):
            self.ts, self.columns = ts, columns
            return
        if len(ts) and ts[0] > self.ts[-1]:
            self.ts = np.concatenate([self.ts, ts])  # the usual case: newer points
            self.columns = np.hstack([self.columns, columns])
            return
        self.ts, self.columns = _dedupe(
            np.concatenate([self.ts, ts]), np.hstack([self.columns, columns])
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.ts, self.columns


def _concat(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return np.empty(0), np.empty((k, 0), dtype=np.float32)
    return np.concatenate([p[0] for p in parts]), np.hstack([p[1] for p in parts])


class MetricStore:
    """Chunked time series in the database, with in-memory open buckets.

    ``add`` buffers samples, ``flush`` writes closed buckets (and their rollups), ``query``
    reads a window at one resolution, ``prune`` deletes what is past retention.
    """

    def __init__(self, db: Database, retention: Retention | None = None) -> None:
        self.db = db
        self.retention = retention or Retention()
        self._lock = threading.RLock()
        self._series: dict[SeriesKey, int] = {}
        self._raw: dict[int, _RawBuffer] = {}
        self._minute: dict[int, _RollupBuffer] = {}
        self._hour: dict[int, _RollupBuffer] = {}
        self._closed_raw: list[tuple[int, _RawBuffer]] = []
        # Earliest moment some open bucket may close: flush() is a no-op before it.
        self._next_close = float("inf")
        self._opened = False
        self.samples_added = 0

    # -- opening: series ids, the open raw bucket, rollups rebuilt -------------------------

    def open(self, now: float | None = None) -> MetricStore:
        """Load series ids, read back the open raw bucket and rebuild open rollups."""
        now = clock() if now is None else now
        with self._lock:
            with self.db.engine.connect() as conn:
                rows = conn.execute(
                    select(
                        MetricSeries.id,
                        MetricSeries.entity,
                        MetricSeries.entity_id,
                        MetricSeries.metric,
                    )
                ).all()
                self._series = {(e, int(i), m): int(sid) for sid, e, i, m in rows}
                self._load_open_raw(conn, now)
            self._rebuild_rollups(now)
            self._opened = True
        return self

    def _load_open_raw(self, conn: Connection, now: float) -> None:
        bucket = _bucket(now, RAW)
        rows = conn.execute(
            select(MetricChunk.series_id, MetricChunk.count, MetricChunk.data).where(
                MetricChunk.resolution == RAW, MetricChunk.start == bucket
            )
        ).all()
        for sid, count, data in rows:
            ts, columns = decode_chunk(bucket, count, data)
            buffer = _RawBuffer(bucket)
            buffer.ts.extend(ts.tolist())
            buffer.values.extend(columns[0].astype(np.float64).tolist())
            self._raw[sid] = buffer
        if rows:
            self._next_close = min(self._next_close, bucket + SPAN[RAW])

    def _rebuild_rollups(self, now: float) -> None:
        """Recompute the rollups from the newest one on (it may be partial, or missing after
        a crash) out of the finer tier; closed buckets are written, open ones kept."""
        for tier, finer in ((MINUTE, RAW), (HOUR, MINUTE)):
            span = SPAN[tier]
            with self.db.engine.connect() as conn:
                newest = conn.scalar(
                    select(func.max(MetricChunk.start)).where(MetricChunk.resolution == tier)
                )
                if newest is None:
                    newest = conn.scalar(
                        select(func.min(MetricChunk.start)).where(MetricChunk.resolution == finer)
                    )
                if newest is None:
                    continue
                since = max(_bucket(newest, tier), _bucket(now - self.retention.of(finer), tier))
                open_raw = _bucket(now, RAW)
                stmt = (
                    select(
                        MetricChunk.series_id,
                        MetricChunk.start,
                        MetricChunk.count,
                        MetricChunk.data,
                    )
                    .where(MetricChunk.resolution == finer, MetricChunk.start >= since)
                    .order_by(MetricChunk.series_id, MetricChunk.start)
                )
                rows = conn.execute(stmt).all()
            by_series: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
            for sid, start, count, data in rows:
                if finer == RAW and start == open_raw and sid in self._raw:
                    continue  # the open raw bucket stays raw until it closes
                by_series.setdefault(sid, []).append(decode_chunk(start, count, data))
            written: list[dict[str, Any]] = []
            buffers = self._minute if tier == MINUTE else self._hour
            for sid, parts in by_series.items():
                ts, columns = _concat(parts, 1 if finer == RAW else ROLLUP_COLUMNS)
                points_ts, points = rollup(ts, columns, tier)
                buckets = (np.floor_divide(points_ts, span) * span).astype(np.int64)
                for bucket in np.unique(buckets).tolist():
                    mask = buckets == bucket
                    if bucket + span <= now:
                        written.append(_row(sid, tier, bucket, points_ts[mask], points[:, mask]))
                    else:
                        buffer = buffers.setdefault(sid, _RollupBuffer(bucket))
                        buffer.merge(points_ts[mask], points[:, mask])
                        self._next_close = min(self._next_close, bucket + span)
            self._upsert(written)
            if written:
                log.info("rebuilt %d %s rollup chunks", len(written), RESOLUTION_NAMES[tier])

    # -- writing ---------------------------------------------------------------------------

    def series_ids(self, keys: Iterable[SeriesKey]) -> dict[SeriesKey, int]:
        """The ids of ``keys``, creating the series that are new."""
        with self._lock:
            missing = [k for k in dict.fromkeys(keys) if k not in self._series]
            if missing:
                self._create_series(missing)
            return {k: self._series[k] for k in keys}

    def _create_series(self, keys: list[SeriesKey]) -> None:
        with self.db.engine.begin() as conn:
            values = [{"entity": e, "entity_id": i, "metric": m} for e, i, m in keys]
            conn.execute(_insert(conn, MetricSeries.__table__).on_conflict_do_nothing(), values)
            rows = conn.execute(
                select(
                    MetricSeries.id,
                    MetricSeries.entity,
                    MetricSeries.entity_id,
                    MetricSeries.metric,
                ).where(MetricSeries.entity.in_({k[0] for k in keys}))
            ).all()
        for sid, e, i, m in rows:
            self._series[(e, int(i), m)] = int(sid)

    def add(self, ts: float, samples: Mapping[SeriesKey, float]) -> None:
        """Buffer one sample of each series at ``ts`` (Unix seconds)."""
        if not samples:
            return
        bucket = _bucket(ts, RAW)
        with self._lock:
            series = self._series
            raw = self._raw
            # The hot loop of ingestion: a few dict lookups and two appends per sample.
            for key, value in samples.items():
                sid = series.get(key)
                if sid is None:
                    # Create every new series of this batch in one transaction.
                    sid = self.series_ids(samples.keys())[key]
                buffer = raw.get(sid)
                if buffer is None or buffer.start != bucket:
                    if buffer is not None and buffer.start > bucket:
                        continue  # a late sample of a closed bucket: dropped
                    if buffer is not None:
                        self._closed_raw.append((sid, buffer))
                    buffer = raw[sid] = _RawBuffer(bucket)
                    self._next_close = min(self._next_close, bucket + SPAN[RAW])
                buffer.ts.append(ts)
                buffer.values.append(value)
            self.samples_added += len(samples)

    def flush(self, now: float | None = None, *, final: bool = False) -> int:
        """Write the buckets that closed by ``now`` and their rollups; ``final`` also writes
        every open bucket as a partial row (at shutdown). Returns the rows written."""
        now = clock() if now is None else now
        with self._lock:
            if not final and now < self._next_close and not self._closed_raw:
                return 0
            rows = self._close(now)
            if final:
                rows.extend(self._partial_rows())
            self._upsert(rows)
            self._next_close = self._earliest_close()
            return len(rows)

    def _close(self, now: float) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        closed = self._closed_raw
        self._closed_raw = []
        for sid, buffer in list(self._raw.items()):
            if buffer.start + SPAN[RAW] <= now:
                closed.append((sid, buffer))
                del self._raw[sid]
        pace = yield_gil_every()
        for sid, buffer in closed:
            ts, columns = buffer.arrays()
            rows.append(_row(sid, RAW, buffer.start, ts, columns))
            self._merge_up(sid, MINUTE, *rollup(ts, columns, MINUTE), rows)
            pace()
        for sid, minute in list(self._minute.items()):
            if minute.start + SPAN[MINUTE] <= now:
                pace()
                del self._minute[sid]
                ts, columns = minute.arrays()
                rows.append(_row(sid, MINUTE, minute.start, ts, columns))
                self._merge_up(sid, HOUR, *rollup(ts, columns, HOUR), rows)
        for sid, hour in list(self._hour.items()):
            if hour.start + SPAN[HOUR] <= now:
                del self._hour[sid]
                rows.append(_row(sid, HOUR, hour.start, *hour.arrays()))
        return [r for r in rows if r["count"]]

    def _merge_up(
        self, sid: int, tier: int, ts: np.ndarray, columns: np.ndarray, rows: list[dict[str, Any]]
    ) -> None:
        """Add rollup points to the open bucket of ``tier``, closing an older one first."""
        if len(ts) == 0:
            return
        buffers = self._minute if tier == MINUTE else self._hour
        bucket = _bucket(float(ts[0]), tier)
        buffer = buffers.get(sid)
        if buffer is not None and bucket < buffer.start:
            log.debug("dropping late %s points of series %s", RESOLUTION_NAMES[tier], sid)
            return
        if buffer is not None and buffer.start != bucket:
            # Samples stopped for a whole bucket (a VM was off): close the old one now.
            del buffers[sid]
            old_ts, old_columns = buffer.arrays()
            rows.append(_row(sid, tier, buffer.start, old_ts, old_columns))
            if tier == MINUTE:
                self._merge_up(sid, HOUR, *rollup(old_ts, old_columns, HOUR), rows)
            buffer = None
        if buffer is None:
            buffer = buffers[sid] = _RollupBuffer(bucket)
        buffer.merge(ts, columns)

    def _partial_rows(self) -> list[dict[str, Any]]:
        rows = []
        for sid, buffer in self._raw.items():
            ts, columns = buffer.arrays()
            rows.append(_row(sid, RAW, buffer.start, ts, columns))
        for tier in (MINUTE, HOUR):
            for sid in set(self._hour) | set(self._minute) | set(self._raw):
                rows.extend(_rows_by_bucket(sid, tier, *self._open_points(sid, tier)))
        return [r for r in rows if r["count"]]

    def _earliest_close(self) -> float:
        starts = [b.start + SPAN[RAW] for b in self._raw.values()]
        starts += [b.start + SPAN[MINUTE] for b in self._minute.values()]
        starts += [b.start + SPAN[HOUR] for b in self._hour.values()]
        return min(starts, default=float("inf"))

    def _upsert(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        pace = yield_gil_every()
        with self.db.engine.begin() as conn:
            stmt = _insert(conn, MetricChunk.__table__)
            stmt = stmt.on_conflict_do_update(
                index_elements=["series_id", "resolution", "start"],
                set_={"count": stmt.excluded.count, "data": stmt.excluded.data},
            )
            for first in range(0, len(rows), UPSERT_BATCH):
                conn.execute(stmt, rows[first : first + UPSERT_BATCH])
                pace()

    # -- reading ---------------------------------------------------------------------------

    def _open_points(self, sid: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
        """The points of the open buckets of ``sid`` at ``resolution`` (caller holds the
        lock): rollups of the open raw bucket are derived on the fly."""
        raw = self._raw.get(sid)
        raw_ts, raw_columns = raw.arrays() if raw is not None else (np.empty(0), None)
        if resolution == RAW:
            if raw_columns is None:
                return np.empty(0), np.empty((1, 0), dtype=np.float32)
            return raw_ts, raw_columns
        minute = self._minute.get(sid)
        parts = [minute.arrays()] if minute is not None else []
        if raw_columns is not None and len(raw_ts):
            parts.append(rollup(raw_ts, raw_columns, MINUTE))
        minute_ts, minute_columns = _dedupe(*_concat(parts, ROLLUP_COLUMNS))
        if resolution == MINUTE:
            return minute_ts, minute_columns
        hour = self._hour.get(sid)
        parts = [hour.arrays()] if hour is not None else []
        if len(minute_ts):
            parts.append(rollup(minute_ts, minute_columns, HOUR))
        return _dedupe(*_concat(parts, ROLLUP_COLUMNS))

    def query(self, key: SeriesKey, resolution: int, since: float, until: float) -> Points:
        """The points of ``key`` with ``since <= ts <= until`` at ``resolution``."""
        if resolution not in RESOLUTIONS:
            raise ValueError(f"unknown resolution {resolution!r}")
        k = 1 if resolution == RAW else ROLLUP_COLUMNS
        with self._lock:
            sid = self._series.get(key)
            if sid is None:
                return Points.empty()
            # Memory first: a bucket written between the two reads then shows up twice
            # (and is deduplicated), never zero times.
            memory = self._open_points(sid, resolution)
        span = SPAN[resolution]
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(MetricChunk.start, MetricChunk.count, MetricChunk.data)
                .where(
                    MetricChunk.series_id == sid,
                    MetricChunk.resolution == resolution,
                    MetricChunk.start > since - span,
                    MetricChunk.start <= until,
                )
                .order_by(MetricChunk.start)
            ).all()
        parts = [decode_chunk(start, count, data) for start, count, data in rows]
        parts.append(memory)
        ts, columns = _dedupe(*_concat(parts, k))
        mask = (ts >= since) & (ts <= until)
        ts, columns = ts[mask], columns[:, mask]
        if resolution == RAW:
            return Points(ts, columns[0], columns[0], columns[0])
        return Points(ts, columns[0], columns[1], columns[2])

    def latest(self, key: SeriesKey) -> tuple[float, float] | None:
        """The newest buffered raw sample of ``key``, if any."""
        with self._lock:
            sid = self._series.get(key)
            buffer = self._raw.get(sid) if sid is not None else None
            if buffer is None or not buffer.ts:
                return None
            return buffer.ts[-1], buffer.values[-1]

    # -- pruning ---------------------------------------------------------------------------

    def prune(self, now: float | None = None) -> int:
        """Delete the chunks whose whole bucket is past its tier's retention."""
        now = clock() if now is None else now
        deleted = 0
        with self.db.engine.begin() as conn:
            for resolution in RESOLUTIONS:
                cutoff = now - self.retention.of(resolution) - SPAN[resolution]
                result = conn.execute(
                    delete(MetricChunk).where(
                        MetricChunk.resolution == resolution, MetricChunk.start <= cutoff
                    )
                )
                deleted += result.rowcount or 0
        return deleted

    def stats(self) -> dict[str, int]:
        """Rows per tier and series in memory (for logs and the benchmark)."""
        with self.db.engine.connect() as conn:
            counts = dict(
                conn.execute(
                    select(MetricChunk.resolution, func.count()).group_by(MetricChunk.resolution)
                ).all()
            )
        with self._lock:
            return {
                "series": len(self._series),
                "open_raw": len(self._raw),
                **{f"rows_{RESOLUTION_NAMES[r]}": int(counts.get(r, 0)) for r in RESOLUTIONS},
            }


def _bucket(ts: float, resolution: int) -> int:
    span = SPAN[resolution]
    return int(ts // span) * span


def _row(sid: int, resolution: int, start: int, ts: np.ndarray, columns: np.ndarray) -> dict:
    return {
        "series_id": sid,
        "resolution": resolution,
        "start": int(start),
        "count": len(ts),
        "data": encode_chunk(int(start), ts, columns),
    }


def _rows_by_bucket(sid: int, tier: int, ts: np.ndarray, columns: np.ndarray) -> list[dict]:
    buckets = (np.floor_divide(ts, SPAN[tier]) * SPAN[tier]).astype(np.int64)
    return [
        _row(sid, tier, bucket, ts[buckets == bucket], columns[:, buckets == bucket])
        for bucket in np.unique(buckets).tolist()
    ]


def _dedupe(ts: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted by time; of equal timestamps the last one wins (memory after the database)."""
    if len(ts) < 2:
        return ts, columns
    reverse = ts[::-1]
    _, first = np.unique(reverse, return_index=True)
    keep = len(ts) - 1 - first
    if len(keep) == len(ts) and np.all(np.diff(ts) > 0):
        return ts, columns
    return ts[keep], columns[:, keep]


def _insert(conn: Connection, table: Any) -> Any:
    # INSERT ... ON CONFLICT is spelled the same on both, but lives in each dialect.
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
