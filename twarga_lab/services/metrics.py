"""Host and VM metrics: a collector inside the service, history, thresholds, Prometheus.

Every ``interval`` seconds the collector reads the host with psutil and every domain of
ours with ONE bulk libvirt call (state and CPU time); every ``slow_interval`` seconds a
second bulk call reads balloon, block and interface counters. Both run in the metrics'
own worker thread, so the event loop only schedules them; a loop-lag probe measures the
longest stall anyone could have seen and exports it.

Samples go to :class:`~twarga_lab.services.metric_store.MetricStore` (chunked, rolled up,
pruned); thresholds raise one warning event when crossed and one info event on recovery.
No tornado here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select

from twarga_lab.db import Database
from twarga_lab.db.models import VM, User, VMStatus
from twarga_lab.errors import InvalidRequest, TwargaError, ValidationFailed
from twarga_lab.services.background import cancel_and_wait
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.metric_store import (
    HOUR,
    MINUTE,
    RAW,
    RESOLUTION_NAMES,
    MetricStore,
    Retention,
    SeriesKey,
)
from twarga_lab.virt.backend import DomainState, HypervisorBackend, LifecycleEvent
from twarga_lab.virt.stats import DomainStatsReader, FastStats, SlowStats

log = logging.getLogger(__name__)

MB = 1024 * 1024
GB = 1024**3

# What the history API can read, per entity, with units for people.
HOST_METRICS = {
    "cpu_usage": "%",
    "memory_usage": "%",
    "swap_usage": "%",
    "disk_usage": "%",
    "disk_read_bytes_per_s": "B/s",
    "disk_write_bytes_per_s": "B/s",
    "net_sent_bytes_per_s": "B/s",
    "net_recv_bytes_per_s": "B/s",
}
VM_METRICS = {
    "cpu_usage": "%",
    "memory_usage": "%",
    "disk_usage": "%",
    "disk_read_bytes_per_s": "B/s",
    "disk_write_bytes_per_s": "B/s",
    "net_sent_bytes_per_s": "B/s",
    "net_recv_bytes_per_s": "B/s",
}
METRICS = {"host": HOST_METRICS, "vm": VM_METRICS}
THRESHOLD_LABELS = {
    "cpu_usage": "CPU usage",
    "memory_usage": "memory usage",
    "disk_usage": "disk usage",
}
# The seed's (Twarga Cloud's) metric names; ``network`` reads both directions.
SEED_METRICS = {
    "cpu": ("cpu_usage",),
    "memory": ("memory_usage",),
    "disk": ("disk_usage",),
    "network": ("net_sent_bytes_per_s", "net_recv_bytes_per_s"),
}
# Without a step, a window is read at the resolution that gives about this many points.
TARGET_POINTS = 1000
# One request may ask for at most this many points (window / step): a 90-day window with
# a 1-second step would otherwise be a request to shape millions of buckets.
MAX_POINTS = 20_000
NATURAL_STEP = {MINUTE: 60.0, HOUR: 3600.0}
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# How often the VM list is re-read from the database even without lifecycle events
# (a rename changes the labels, nothing else).
VM_INDEX_MAX_AGE = 60.0


def clock() -> float:
    """Now, in Unix seconds. Module level so tests can patch the collector's clock."""
    return time.time()


_heap_frozen = False
# Nice value of the metrics thread: when the CPUs are busy, the event loop thread (nice 0)
# is scheduled first, so the collector delays requests as little as possible.
METRICS_THREAD_NICE = 10


def _background_priority() -> None:
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


def iso(ts: float) -> str:
    """A Unix time as ISO 8601 UTC, like every other timestamp of the API."""
    return datetime.fromtimestamp(ts, UTC).isoformat()


# -- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """Percentages that raise a warning once they hold for ``hold_seconds``."""

    cpu: float = 90.0
    memory: float = 90.0
    disk: float = 90.0
    hold_seconds: float = 60.0

    def limit(self, metric: str) -> float | None:
        return {"cpu_usage": self.cpu, "memory_usage": self.memory, "disk_usage": self.disk}.get(
            metric
        )


@dataclass(frozen=True)
class MetricsConfig:
    """What the metrics service needs from the application's settings."""

    interval: float = 10.0
    slow_interval: float = 30.0
    prune_interval: float = 600.0
    domain_prefix: str = "twarga-"
    disk_path: Path = Path("/")
    retention: Retention = field(default_factory=Retention)
    thresholds: Thresholds = field(default_factory=Thresholds)
    # ``Authorization: Bearer <token>`` lets a Prometheus server scrape; empty: admins only.
    scrape_token: str = field(default="", repr=False)


# -- the host ----------------------------------------------------------------------------


class _HostCounters(NamedTuple):
    at: float
    cpu_busy: float
    cpu_total: float
    disk_read: int
    disk_write: int
    net_sent: int
    net_recv: int


class HostReader:
    """The host's CPU, memory, disk and network from psutil; rates from the previous read.

    CPU usage is computed from ``cpu_times`` deltas of this reader alone, so nothing else
    calling ``psutil.cpu_percent`` in the process can skew it.
    """

    def __init__(self, disk_path: Path) -> None:
        self.disk_path = disk_path
        self._lock = threading.Lock()  # the collector and an early API read may overlap
        # The baseline of the first reading's rates: taken now, so that reading needs no wait.
        self._previous = self._counters(time.monotonic())

    def _counters(self, at: float) -> _HostCounters:
        times = psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        total = sum(times)
        disk = psutil.disk_io_counters()
        net = psutil.net_io_counters()
        return _HostCounters(
            at=at,
            cpu_busy=total - idle,
            cpu_total=total,
            disk_read=disk.read_bytes if disk else 0,
            disk_write=disk.write_bytes if disk else 0,
            net_sent=net.bytes_sent,
            net_recv=net.bytes_recv,
        )

    def read(self, now: float) -> dict[str, Any]:
        """One reading in the API's shape (``GET /metrics/host``)."""
        with self._lock:
            current = self._counters(time.monotonic())
            previous = self._previous
            self._previous = current
        elapsed = max(current.at - previous.at, 1e-6)
        cpu_delta = current.cpu_total - previous.cpu_total
        cpu_usage = 100.0 * (current.cpu_busy - previous.cpu_busy) / cpu_delta if cpu_delta else 0.0

        def rate(now_value: int, then_value: int) -> float:
            return max(0, now_value - then_value) / elapsed  # counters reset on wrap

        memory = psutil.virtual_memory()
        swap = psutil.swap_memory()
        disk = psutil.disk_usage(str(_existing(self.disk_path)))
        freq = psutil.cpu_freq()
        sent_rate = rate(current.net_sent, previous.net_sent)
        recv_rate = rate(current.net_recv, previous.net_recv)
        used = memory.total - memory.available
        return {
            "cpu": {
                "usage_percent": round(min(100.0, max(0.0, cpu_usage)), 2),
                "count": psutil.cpu_count(logical=True) or 1,
                "frequency_mhz": round(freq.current, 1) if freq else 0.0,
            },
            "memory": {
                "usage_percent": round(100.0 * used / memory.total, 2) if memory.total else 0.0,
                "used_mb": round(used / MB, 1),
                "total_mb": round(memory.total / MB, 1),
                "available_mb": round(memory.available / MB, 1),
                "swap_percent": round(swap.percent, 2),
                "swap_used_mb": round(swap.used / MB, 1),
                "swap_total_mb": round(swap.total / MB, 1),
            },
            "disk": {
                "path": str(self.disk_path),
                "usage_percent": round(disk.percent, 2),
                "used_gb": round(disk.used / GB, 2),
                "total_gb": round(disk.total / GB, 2),
                "free_gb": round(disk.free / GB, 2),
                "read_bytes": current.disk_read,
                "write_bytes": current.disk_write,
                "read_bytes_per_s": round(rate(current.disk_read, previous.disk_read), 1),
                "write_bytes_per_s": round(rate(current.disk_write, previous.disk_write), 1),
            },
            "network": {
                "bytes_sent": current.net_sent,
                "bytes_recv": current.net_recv,
                "sent_bytes_per_s": round(sent_rate, 1),
                "recv_bytes_per_s": round(recv_rate, 1),
                "sent_mbps": round(sent_rate * 8 / 1e6, 3),
                "recv_mbps": round(recv_rate * 8 / 1e6, 3),
            },
            "timestamp": iso(now),
        }


def host_samples(host: dict[str, Any]) -> dict[SeriesKey, float]:
    """The stored series of one host reading."""
    return {
        ("host", 0, "cpu_usage"): host["cpu"]["usage_percent"],
        ("host", 0, "memory_usage"): host["memory"]["usage_percent"],
        ("host", 0, "swap_usage"): host["memory"]["swap_percent"],
        ("host", 0, "disk_usage"): host["disk"]["usage_percent"],
        ("host", 0, "disk_read_bytes_per_s"): host["disk"]["read_bytes_per_s"],
        ("host", 0, "disk_write_bytes_per_s"): host["disk"]["write_bytes_per_s"],
        ("host", 0, "net_sent_bytes_per_s"): host["network"]["sent_bytes_per_s"],
        ("host", 0, "net_recv_bytes_per_s"): host["network"]["recv_bytes_per_s"],
    }


def _existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


# -- VMs ---------------------------------------------------------------------------------


@dataclass
class VMReading:
    """What the collector knows of one VM now."""

    vm_id: int
    name: str
    owner: str
    domain: str
    vcpus: int = 1
    state: DomainState = DomainState.unknown
    cpu_time_ns: int | None = None
    cpu_at: float | None = None
    cpu_usage: float = 0.0
    memory_used_kib: int | None = None
    memory_total_kib: int | None = None
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    disk_allocation_bytes: int = 0
    disk_capacity_bytes: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    disk_read_bytes_per_s: float = 0.0
    disk_write_bytes_per_s: float = 0.0
    net_recv_bytes_per_s: float = 0.0
    net_sent_bytes_per_s: float = 0.0
    slow_at: float | None = None
    updated_at: float | None = None

    @property
    def memory_usage(self) -> float:
        if not self.memory_used_kib or not self.memory_total_kib:
            return 0.0
        return min(100.0, 100.0 * self.memory_used_kib / self.memory_total_kib)

    @property
    def disk_usage(self) -> float:
        if not self.disk_capacity_bytes:
            return 0.0
        return min(100.0, 100.0 * self.disk_allocation_bytes / self.disk_capacity_bytes)

    def apply_fast(self, stats: FastStats, vcpus: int, now: float) -> float | None:
        """Take a fast reading; returns the CPU usage when there is a previous one."""
        self.state = stats.state
        self.vcpus = vcpus
        self.updated_at = now
        if stats.state is not DomainState.running or stats.cpu_time_ns is None:
            self.cpu_usage = 0.0
            self.cpu_time_ns, self.cpu_at = stats.cpu_time_ns, now
            return None
        previous, previous_at = self.cpu_time_ns, self.cpu_at
        self.cpu_time_ns, self.cpu_at = stats.cpu_time_ns, now
        if previous is None or previous_at is None or now <= previous_at:
            return None
        if stats.cpu_time_ns < previous:
            return None  # the domain restarted: its CPU time began again at zero
        # CPU time is summed over vCPUs: 100 % means every vCPU busy for the whole interval.
        usage = (stats.cpu_time_ns - previous) / ((now - previous_at) * 1e9 * max(1, vcpus))
        self.cpu_usage = round(min(100.0, max(0.0, 100.0 * usage)), 2)
        return self.cpu_usage

    def apply_slow(self, stats: SlowStats, now: float) -> dict[str, float]:
        """Take a slow reading; returns the values to store."""
        if self.slow_at is not None and now > self.slow_at:
            elapsed = now - self.slow_at

            def rate(new: int, old: int) -> float:
                return round(max(0, new - old) / elapsed, 1)

            self.disk_read_bytes_per_s = rate(stats.disk_read_bytes, self.disk_read_bytes)
            self.disk_write_bytes_per_s = rate(stats.disk_write_bytes, self.disk_write_bytes)
            self.net_recv_bytes_per_s = rate(stats.net_rx_bytes, self.net_rx_bytes)
            self.net_sent_bytes_per_s = rate(stats.net_tx_bytes, self.net_tx_bytes)
            has_rates = True
        else:
            has_rates = False
        self.slow_at = now
        self.memory_used_kib = stats.memory_used_kib
        self.memory_total_kib = stats.memory_total_kib
        self.disk_read_bytes = stats.disk_read_bytes
        self.disk_write_bytes = stats.disk_write_bytes
        self.disk_allocation_bytes = stats.disk_allocation_bytes
        self.disk_capacity_bytes = stats.disk_capacity_bytes
        self.net_rx_bytes = stats.net_rx_bytes
        self.net_tx_bytes = stats.net_tx_bytes
        values = {
            "memory_usage": round(self.memory_usage, 2),
            "disk_usage": round(self.disk_usage, 2),
        }
        if has_rates:
            values.update(
                disk_read_bytes_per_s=self.disk_read_bytes_per_s,
                disk_write_bytes_per_s=self.disk_write_bytes_per_s,
                net_recv_bytes_per_s=self.net_recv_bytes_per_s,
                net_sent_bytes_per_s=self.net_sent_bytes_per_s,
            )
        return values


@dataclass(frozen=True)
class _VMRef:
    vm_id: int
    name: str
    owner: str
    domain: str
    cpu: int


# -- thresholds --------------------------------------------------------------------------


@dataclass
class _Watch:
    alarm: bool = False
    since: float | None = None  # start of the current streak on the other side


class ThresholdWatch:
    """Per series: ``crossed`` once a value stays above its limit for ``hold_seconds``,
    ``recovered`` once it stays at or below it as long. Nothing in between."""

    def __init__(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        self._watches: dict[SeriesKey, _Watch] = {}

    def observe(self, key: SeriesKey, value: float, now: float) -> str | None:
        """``"crossed"``, ``"recovered"`` or None for one new value of ``key``."""
        limit = self.thresholds.limit(key[2])
        if limit is None or math.isnan(value):
            return None
        watch = self._watches.setdefault(key, _Watch())
        # The streak that counts is the one on the other side of the current alarm state.
        moving = (value > limit) != watch.alarm
        if not moving:
            watch.since = None
            return None
        if watch.since is None:
            watch.since = now
        if now - watch.since < self.thresholds.hold_seconds:
            return None
        watch.alarm = not watch.alarm
        watch.since = None
        return "crossed" if watch.alarm else "recovered"

    def forget(self, entity: str, entity_id: int) -> None:
        for key in [k for k in self._watches if k[0] == entity and k[1] == entity_id]:
            del self._watches[key]


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


# -- the service -------------------------------------------------------------------------


class MetricsService:
    """Collects, stores, answers and exports metrics."""

    def __init__(
        self,
        db: Database,
        backend: HypervisorBackend | None,
        config: MetricsConfig,
        store: MetricStore | None = None,
    ) -> None:
        self.db = db
        self.backend = backend
        self.config = config
        self.store = store or MetricStore(db, config.retention)
        self.host_reader = HostReader(config.disk_path)
        call = getattr(backend, "call", None)
        self.reader = DomainStatsReader(call, config.domain_prefix) if call else None
        self.thresholds = ThresholdWatch(config.thresholds)
        self.probe = LoopLagProbe()
        self._lock = threading.RLock()
        self._host: dict[str, Any] | None = None
        self._vms: dict[int, VMReading] = {}
        self._by_domain: dict[str, _VMRef] = {}
        self._unmapped: set[str] = set()
        self._vm_index_at = -math.inf
        self._vm_index_dirty = True
        self._opened = False
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Future[Any]] = set()
        self.last_collect_seconds = 0.0
        self.last_slow_seconds = 0.0
        self.ticks = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PrometheusExposition(self))

    # -- blocking work (the metrics thread) -------------------------------------------------

    def open(self) -> None:
        """Read back the store's open buckets (once)."""
        if not self._opened:
            self.store.open()
            self._opened = True

    def collect(self) -> None:
        """One fast tick: the host, then state and CPU of every domain in one bulk call."""
        started = time.perf_counter()
        now = clock()
        host = self.host_reader.read(now)
        samples = host_samples(host)
        fast: dict[str, FastStats] = {}
        if self.reader is not None:
            try:
                fast = self.reader.fast()
            except TwargaError as e:
                log.warning("metrics: cannot read domain statistics: %s", e.message)
        self._refresh_vm_index(now, fast)
        # vCPU counts come from the cached domain XML (read once per lifecycle change).
        facts = {name: self.reader.facts(name) for name in fast} if self.reader else {}
        with self._lock:
            self._host = host
            for name, stats in fast.items():
                ref = self._by_domain.get(name)
                if ref is None:
                    continue
                fact = facts.get(name)
                reading = self._reading(ref)
                usage = reading.apply_fast(stats, fact.vcpus if fact else ref.cpu, now)
                if usage is not None:
                    samples[("vm", ref.vm_id, "cpu_usage")] = usage
        self.store.add(now, samples)
        self.store.flush(now)
        self._check_thresholds(samples, now)
        self.ticks += 1
        self.last_collect_seconds = time.perf_counter() - started

    def collect_slow(self) -> None:
        """Memory, disk and network counters of every running domain in one bulk call."""
        if self.reader is None:
            return
        started = time.perf_counter()
        now = clock()
        try:
            slow = self.reader.slow()
        except TwargaError as e:
            log.warning("metrics: cannot read domain counters: %s", e.message)
            return
        self._refresh_vm_index(now, slow)
        samples: dict[SeriesKey, float] = {}
        with self._lock:
            for name, stats in slow.items():
                ref = self._by_domain.get(name)
                if ref is None:
                    continue
                for metric, value in self._reading(ref).apply_slow(stats, now).items():
                    samples[("vm", ref.vm_id, metric)] = value
        self.store.add(now, samples)
        self._check_thresholds(samples, now)
        self.last_slow_seconds = time.perf_counter() - started

    def prune(self) -> int:
        """Delete what is past retention."""
        deleted = self.store.prune(clock())
        if deleted:
            log.info("metrics: pruned %d chunks", deleted)
        return deleted

    def flush_all(self) -> None:
        """Write every open bucket (at shutdown)."""
        self.store.flush(clock(), final=True)

    def _reading(self, ref: _VMRef) -> VMReading:
        reading = self._vms.get(ref.vm_id)
        if reading is None or reading.domain != ref.domain:
            reading = self._vms[ref.vm_id] = VMReading(ref.vm_id, ref.name, ref.owner, ref.domain)
        reading.name, reading.owner = ref.name, ref.owner
        return reading

    def _refresh_vm_index(self, now: float, seen: Mapping[str, Any]) -> None:
        # A domain we have not mapped yet is a VM just created; one without a row (left
        # behind by hand) is not looked up again until the index ages.
        unknown = any(n not in self._by_domain and n not in self._unmapped for n in seen)
        if not (self._vm_index_dirty or unknown or now - self._vm_index_at > VM_INDEX_MAX_AGE):
            return
        self._vm_index_dirty = False
        with self.db.session() as session:
            rows = session.execute(
                select(VM.id, VM.name, VM.domain_name, User.name, VM.cpu)
                .join(User, VM.owner_id == User.id)
                .where(VM.status != VMStatus.destroyed, VM.domain_name.is_not(None))
            ).all()
        prefix = self.config.domain_prefix
        index = {
            domain: _VMRef(vm_id, name, owner, domain, cpu)
            for vm_id, name, domain, owner, cpu in rows
            if domain.startswith(prefix)
        }
        with self._lock:
            self._by_domain = index
            self._unmapped = {name for name in seen if name not in index}
            self._vm_index_at = now
            live = {ref.vm_id for ref in index.values()}
            for vm_id in [v for v in self._vms if v not in live]:
                del self._vms[vm_id]  # destroyed: stop exporting it
                self.thresholds.forget("vm", vm_id)

    def _check_thresholds(self, samples: Mapping[SeriesKey, float], now: float) -> None:
        changes = []
        with self._lock:
            for key, value in samples.items():
                if key[2] in THRESHOLD_LABELS:
                    change = self.thresholds.observe(key, value, now)
                    if change is not None:
                        changes.append((key, value, change))
            owners = {ref.vm_id: (ref.name, ref.owner) for ref in self._by_domain.values()}
        if not changes:
            return
        limits = self.config.thresholds
        with self.db.session() as session:
            for (entity, entity_id, metric), value, change in changes:
                limit = limits.limit(metric)
                label = THRESHOLD_LABELS[metric]
                if entity == "host":
                    who, event_type, vm_id, user = "host", EventType.system, None, None
                else:
                    name, user = owners.get(entity_id, (str(entity_id), None))
                    who, event_type, vm_id = f"VM {name}", EventType.vm, entity_id
                if change == "crossed":
                    severity = Severity.warning
                    text = (
                        f"{who} {label} is {value:.1f}%, above {limit:g}% "
                        f"for {limits.hold_seconds:g} s"
                    )
                else:
                    severity = Severity.info
                    text = f"{who} {label} is back to {value:.1f}% (limit {limit:g}%)"
                record_event(
                    session,
                    event_type,
                    severity,
                    text,
                    user_name=user,
                    vm_id=vm_id,
                    source="metrics",
                    action=f"threshold_{change}",
                    metric=metric,
                    value=round(value, 2),
                    threshold=limit,
                    hold_seconds=limits.hold_seconds,
                )

    def on_lifecycle(self, event: LifecycleEvent) -> None:
        """A domain changed state (libvirt's thread): its XML and our VM list may have."""
        if not event.domain.startswith(self.config.domain_prefix):
            return
        if self.reader is not None:
            self.reader.forget(event.domain)
        self._vm_index_dirty = True

    # -- reads (worker threads) ------------------------------------------------------------

    def host_now(self) -> dict[str, Any]:
        """The latest host reading (read now if the collector has not ticked yet)."""
        with self._lock:
            host = self._host
        if host is None:
            host = self.host_reader.read(clock())
            with self._lock:
                self._host = host
        return host

    def vm_now(self, vm: dict[str, Any]) -> dict[str, Any]:
        """The latest reading of ``vm`` (a ``VMService.get`` view) in the API's shape."""
        with self._lock:
            reading = self._vms.get(vm["id"])
            r = VMReading(vm["id"], vm["name"], vm["owner"], vm["domain"] or "")
            if reading is not None:
                r = VMReading(**{f: getattr(reading, f) for f in reading.__dataclass_fields__})
        running = vm["status"] == VMStatus.running.value
        return {
            "vm_id": vm["id"],
            "name": vm["name"],
            "status": vm["status"],
            "cpu_usage": r.cpu_usage if running else 0.0,
            "cpu_time_seconds": round((r.cpu_time_ns or 0) / 1e9, 3),
            "vcpus": r.vcpus if reading is not None else vm["cpu"],
            "memory_usage": round(r.memory_usage, 2) if running else 0.0,
            "memory_used_mb": round((r.memory_used_kib or 0) / 1024, 1) if running else 0.0,
            "memory_total_mb": round((r.memory_total_kib or 0) / 1024, 1) or vm["ram"],
            "disk_usage": round(r.disk_usage, 2),
            "disk_used_gb": round(r.disk_allocation_bytes / GB, 3),
            "disk_total_gb": round(r.disk_capacity_bytes / GB, 3) or vm["disk"],
            "disk_read_bytes": r.disk_read_bytes,
            "disk_write_bytes": r.disk_write_bytes,
            "disk_read_bytes_per_s": r.disk_read_bytes_per_s if running else 0.0,
            "disk_write_bytes_per_s": r.disk_write_bytes_per_s if running else 0.0,
            "network_rx_bytes": r.net_rx_bytes,
            "network_tx_bytes": r.net_tx_bytes,
            "network_rx_bytes_per_s": r.net_recv_bytes_per_s if running else 0.0,
            "network_tx_bytes_per_s": r.net_sent_bytes_per_s if running else 0.0,
            "uptime": vm["uptime"],
            "ip": vm["ip_address"],
            "timestamp": iso(r.updated_at or clock()),
        }

    def history(self, query: HistoryQuery) -> dict[str, Any]:
        """The points of one metric of the host or one VM in a window.

        ``network`` (the seed's name) reads both directions: ``series`` has each, and
        ``points`` their sum."""
        now = clock()
        resolution = choose_resolution(query, now, self.config.retention)
        series = {
            name: self._series_points(query, name, resolution) for name in query.series_names()
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

    def _series_points(self, query: HistoryQuery, metric: str, resolution: int) -> list[list[Any]]:
        """``[[iso time, value], ...]`` of one stored series, downsampled to the step."""
        points = self.store.query(
            (query.entity, query.entity_id or 0, metric), resolution, query.since, query.until
        )
        ts, values = points.ts, points.avg
        natural = NATURAL_STEP.get(resolution, self.config.interval)
        if query.step is not None and query.step > natural:
            ts, values = downsample(ts, values, query.step)
        stamps = np.datetime_as_string(
            np.rint(ts * 1000).astype(np.int64).astype("datetime64[ms]"), unit="s"
        )
        rounded = np.round(values.astype(np.float64), 3).tolist()
        return [[f"{s}+00:00", v] for s, v in zip(stamps.tolist(), rounded, strict=True)]

    def max_window(self) -> float:
        """The longest window a history query may ask for: what the 1-hour tier keeps."""
        return self.config.retention.hour

    def snapshot(self) -> tuple[dict[str, Any] | None, list[VMReading]]:
        """The latest host reading and copies of the VM readings (for the exposition)."""
        with self._lock:
            readings = [
                VMReading(**{f: getattr(r, f) for f in r.__dataclass_fields__})
                for r in self._vms.values()
            ]
            return self._host, readings

    def prometheus_text(self) -> bytes:
        """The Prometheus text exposition of the current values."""
        return generate_latest(self.registry)

    # -- the collector task ----------------------------------------------------------------

    async def _in_thread(self, fn: Any) -> Any:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _side(self, fn: Any, what: str) -> asyncio.Future[Any] | None:
        """Run ``fn`` in a metrics thread without waiting; skipped while one still runs."""
        if any(getattr(t, "twarga_what", None) == what for t in self._side_tasks):
            return None
        assert self._executor is not None
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        future.twarga_what = what  # type: ignore[attr-defined]
        self._side_tasks.add(future)

        def done(f: asyncio.Future[Any]) -> None:
            self._side_tasks.discard(f)
            if not f.cancelled() and f.exception() is not None:
                log.error("metrics %s failed", what, exc_info=f.exception())

        future.add_done_callback(done)
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._in_thread(self.open)
        except Exception:
            log.exception("metrics: reading back the open buckets failed; starting empty")
        next_slow = loop.time()
        next_prune = loop.time() + self.config.prune_interval
        while True:
            started = loop.time()
            try:
                await self._in_thread(self.collect)
            except Exception:
                log.exception("metrics collection failed")
            if loop.time() >= next_slow:
                next_slow = loop.time() + self.config.slow_interval
                self._side(self.collect_slow, "slow")
            if loop.time() >= next_prune:
                next_prune = loop.time() + self.config.prune_interval
                self._side(self.prune, "prune")
            await asyncio.sleep(max(0.0, self.config.interval - (loop.time() - started)))

    def start(self) -> None:
        """Start the collector and the loop-lag probe on the running loop."""
        if self.backend is not None:
            self.backend.add_lifecycle_listener(self.on_lifecycle)
        # Its own thread: a slow libvirt read never takes a worker the API needs, and the fast
        # and slow reads take turns instead of fighting the event loop for the GIL.
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="twarga-metrics", initializer=_background_priority
        )
        freeze_startup_heap()
        self.probe.start()
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop collecting and write the open buckets."""
        await self.probe.stop()
        await cancel_and_wait(self._task)
        self._task = None
        if self._side_tasks:
            await asyncio.wait(list(self._side_tasks), timeout=30)
        if self._executor is not None:
            # A cancelled await does not stop its thread: let in-flight work finish before
            # the backend and the database close under it.
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, True)
            if self._opened:
                try:
                    await asyncio.to_thread(self.flush_all)
                except Exception:
                    log.exception("metrics: writing the open buckets failed")


# -- Prometheus --------------------------------------------------------------------------


class PrometheusExposition(Collector):
    """Current values as Prometheus families, read from the service at scrape time."""

    def __init__(self, service: MetricsService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        host, readings = self.service.snapshot()
        yield from self._host(host)
        yield from self._vms(readings)
        stall = GaugeMetricFamily(
            "twarga_event_loop_max_stall_seconds",
            "Longest delay of the service's event loop in the last minute (loop-lag probe).",
        )
        stall.add_metric([], self.service.probe.max_stall())
        yield stall
        collect = GaugeMetricFamily(
            "twarga_metrics_collect_seconds",
            "Duration of the last metrics collection.",
            labels=["path"],
        )
        collect.add_metric(["fast"], self.service.last_collect_seconds)
        collect.add_metric(["slow"], self.service.last_slow_seconds)
        yield collect

    @staticmethod
    def _host(host: dict[str, Any] | None) -> Iterator[Metric]:
        if host is None:
            return
        gauges = [
            ("cpu_usage_percent", "Host CPU usage.", host["cpu"]["usage_percent"]),
            ("cpu_count", "Logical CPUs of the host.", host["cpu"]["count"]),
            ("cpu_frequency_mhz", "Current CPU frequency.", host["cpu"]["frequency_mhz"]),
            ("memory_usage_percent", "Host memory in use.", host["memory"]["usage_percent"]),
            ("memory_used_bytes", "Host memory in use.", host["memory"]["used_mb"] * MB),
            ("memory_total_bytes", "Host memory.", host["memory"]["total_mb"] * MB),
            (
                "memory_available_bytes",
                "Host memory available.",
                host["memory"]["available_mb"] * MB,
            ),
            ("swap_usage_percent", "Host swap in use.", host["memory"]["swap_percent"]),
            (
                "disk_usage_percent",
                "Use of the VM disks' filesystem.",
                host["disk"]["usage_percent"],
            ),
            (
                "disk_used_bytes",
                "Used bytes of the VM disks' filesystem.",
                host["disk"]["used_gb"] * GB,
            ),
            (
                "disk_total_bytes",
                "Size of the VM disks' filesystem.",
                host["disk"]["total_gb"] * GB,
            ),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"twarga_host_{name}", doc, value=value)
        counters = [
            ("disk_read_bytes", "Bytes read from the host's disks.", host["disk"]["read_bytes"]),
            (
                "disk_written_bytes",
                "Bytes written to the host's disks.",
                host["disk"]["write_bytes"],
            ),
            ("network_sent_bytes", "Bytes the host sent.", host["network"]["bytes_sent"]),
            ("network_received_bytes", "Bytes the host received.", host["network"]["bytes_recv"]),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"twarga_host_{name}", doc, value=value)

    @staticmethod
    def _vms(readings: list[VMReading]) -> Iterator[Metric]:
        labels = ["vm_id", "vm", "owner"]

        def family(kind: type, name: str, doc: str) -> Any:
            return kind(f"twarga_vm_{name}", doc, labels=labels)

        up = family(GaugeMetricFamily, "up", "1 while the VM's domain runs.")
        vcpus = family(GaugeMetricFamily, "vcpus", "vCPUs of the VM.")
        cpu = family(GaugeMetricFamily, "cpu_usage_percent", "CPU usage over all vCPUs.")
        cpu_seconds = family(CounterMetricFamily, "cpu_seconds", "CPU time the VM used.")
        memory = family(GaugeMetricFamily, "memory_usage_percent", "Guest memory in use.")
        memory_used = family(GaugeMetricFamily, "memory_used_bytes", "Guest memory in use.")
        disk = family(GaugeMetricFamily, "disk_usage_percent", "Allocated share of the disks.")
        disk_read = family(CounterMetricFamily, "disk_read_bytes", "Bytes the VM read.")
        disk_written = family(CounterMetricFamily, "disk_written_bytes", "Bytes the VM wrote.")
        net_rx = family(CounterMetricFamily, "network_received_bytes", "Bytes the VM received.")
        net_tx = family(CounterMetricFamily, "network_sent_bytes", "Bytes the VM sent.")
        for r in readings:
            values = [str(r.vm_id), r.name, r.owner]
            running = r.state is DomainState.running
            up.add_metric(values, 1.0 if running else 0.0)
            vcpus.add_metric(values, r.vcpus)
            cpu.add_metric(values, r.cpu_usage if running else 0.0)
            cpu_seconds.add_metric(values, (r.cpu_time_ns or 0) / 1e9)
            memory.add_metric(values, r.memory_usage if running else 0.0)
            memory_used.add_metric(values, (r.memory_used_kib or 0) * 1024.0)
            disk.add_metric(values, r.disk_usage)
            disk_read.add_metric(values, r.disk_read_bytes)
            disk_written.add_metric(values, r.disk_write_bytes)
            net_rx.add_metric(values, r.net_rx_bytes)
            net_tx.add_metric(values, r.net_tx_bytes)
        yield from (up, vcpus, cpu, cpu_seconds, memory, memory_used, disk)
        yield from (disk_read, disk_written, net_rx, net_tx)
