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
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import select
from traitlets import Float, TraitError, Unicode, default
from traitlets.config import LoggingConfigurable

from twarga_lab.db import Database
from twarga_lab.db.models import VM, User, VMStatus
from twarga_lab.errors import TwargaError
from twarga_lab.services.background import cancel_and_wait
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.metric_store import (
    MetricStore,
    Retention,
    SeriesKey,
)
from twarga_lab.services.metrics import catalogue
from twarga_lab.services.metrics.catalogue import (
    THRESHOLD_LABELS,
    VM_INDEX_MAX_AGE,
    Thresholds,
)
from twarga_lab.services.metrics.history import read_history
from twarga_lab.services.metrics.probes import (
    LoopLagProbe,
    background_priority,
    freeze_startup_heap,
)
from twarga_lab.services.metrics.prometheus import PrometheusExposition
from twarga_lab.services.metrics.readers import HostReader, VMReading, VMRef, host_samples, vm_view
from twarga_lab.services.metrics.thresholds import ThresholdWatch
from twarga_lab.virt.backend import HypervisorBackend, LifecycleEvent
from twarga_lab.virt.hosts import DEFAULT_HOST, HostPool
from twarga_lab.virt.stats import DomainStatsReader, FastStats, PoolStatsReader

if TYPE_CHECKING:  # the schema imports the metric catalogue, which is this package
    from twarga_lab.schemas.metrics import HistoryQuery

log = logging.getLogger(__name__)

# -- the service -------------------------------------------------------------------------


class PositiveFloat(Float):
    """A float trait that must be above zero."""

    def validate(self, obj: Any, value: Any) -> float:
        value = float(super().validate(obj, value))
        if value <= 0:
            raise TraitError(f"{self.name} must be positive")
        return value


def default_scrape_token() -> str:
    """The scrape token when none is configured: ``$TWARGA_METRICS_SCRAPE_TOKEN``."""
    return os.environ.get("TWARGA_METRICS_SCRAPE_TOKEN", "")


class MetricsService(LoggingConfigurable):
    """Collects, stores, answers and exports metrics."""

    interval = PositiveFloat(
        10.0,
        help="""Seconds between two metric collections: the host (psutil) and the state and
        CPU time of every VM in one bulk libvirt call.""",
    ).tag(config=True)
    slow_interval = PositiveFloat(
        30.0,
        help="""Seconds between two reads of the VMs' memory, disk and network counters (a
        heavier libvirt call; 30-60 s is sensible).""",
    ).tag(config=True)
    raw_retention_hours = Float(
        Retention.raw / 3600, help="Hours raw metric samples are kept (24 h windows read them)."
    ).tag(config=True)
    minute_retention_days = Float(
        Retention.minute / 86400,
        help="Days 1-minute metric rollups (average, minimum, maximum) are kept.",
    ).tag(config=True)
    hour_retention_days = Float(
        Retention.hour / 86400,
        help="Days 1-hour metric rollups are kept; also the longest history window.",
    ).tag(config=True)
    prune_interval = Float(
        600.0, help="Seconds between two deletions of metrics past their retention."
    ).tag(config=True)
    cpu_threshold = Float(
        Thresholds.cpu, help="CPU usage (%) of the host or a VM that raises a warning event."
    ).tag(config=True)
    memory_threshold = Float(
        Thresholds.memory,
        help="Memory usage (%) of the host or a VM that raises a warning event.",
    ).tag(config=True)
    disk_threshold = Float(
        Thresholds.disk, help="Disk usage (%) of the host or a VM that raises a warning event."
    ).tag(config=True)
    threshold_seconds = Float(
        Thresholds.hold_seconds,
        help="""Seconds a value must stay above its threshold before the warning event, and
        at or below it before the recovery event (one event each way).""",
    ).tag(config=True)
    scrape_token = Unicode(
        help="""Bearer token a Prometheus server sends to ``GET /twarga/metrics``
        (``Authorization: Bearer <token>``). Empty: only admins may read the exposition.""",
    ).tag(config=True)

    @default("scrape_token")
    def _default_scrape_token(self) -> str:
        return default_scrape_token()

    def __init__(
        self,
        db: Database,
        backend: HypervisorBackend | None,
        *,
        domain_prefix: str,
        disk_path: Path,
        store: MetricStore | None = None,
        **kwargs: Any,
    ) -> None:
        """``domain_prefix``: the libvirt domains that are ours; ``disk_path``: where the
        host's disk usage is read (the VM folder)."""
        super().__init__(**kwargs)
        self.db = db
        self.backend = backend
        self.domain_prefix = domain_prefix
        self.store = store or MetricStore(db, self.retention)
        self.host_reader = HostReader(disk_path)
        self.reader: DomainStatsReader | PoolStatsReader | None = None
        if isinstance(backend, HostPool):
            self.reader = PoolStatsReader(backend, domain_prefix)  # one bulk read per host
        elif backend is not None:
            self.reader = DomainStatsReader(backend.call, domain_prefix)
        self.thresholds = ThresholdWatch(self.limits)
        self.probe = LoopLagProbe()
        self._lock = threading.RLock()
        self._host: dict[str, Any] | None = None
        self._vms: dict[int, VMReading] = {}
        self._by_domain: dict[str, VMRef] = {}
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

    @property
    def retention(self) -> Retention:
        """How long each tier of the store is kept, from the settings."""
        return Retention(
            raw=self.raw_retention_hours * 3600,
            minute=self.minute_retention_days * 86400,
            hour=self.hour_retention_days * 86400,
        )

    @property
    def limits(self) -> Thresholds:
        """The warning thresholds, from the settings."""
        return Thresholds(
            cpu=self.cpu_threshold,
            memory=self.memory_threshold,
            disk=self.disk_threshold,
            hold_seconds=self.threshold_seconds,
        )

    # -- blocking work (the metrics thread) -------------------------------------------------

    def open(self) -> None:
        """Read back the store's open buckets (once)."""
        if not self._opened:
            self.store.open()
            self._opened = True

    def collect(self) -> None:
        """One fast tick: the host, then state and CPU of every domain in one bulk call."""
        started = time.perf_counter()
        now = catalogue.clock()
        host = self.host_reader.read(now)
        samples = host_samples(host)
        fast: dict[str, FastStats] = {}
        if self.reader is not None:
            try:
                fast = self.reader.fast()
            except TwargaError as e:
                log.warning("metrics: cannot read domain statistics: %s", e.message)
        if isinstance(self.backend, HostPool):
            self.backend.read_stats()  # each hypervisor's CPU and memory, for Prometheus
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
        now = catalogue.clock()
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
        deleted = self.store.prune(catalogue.clock())
        if deleted:
            log.info("metrics: pruned %d chunks", deleted)
        return deleted

    def flush_all(self) -> None:
        """Write every open bucket (at shutdown)."""
        self.store.flush(catalogue.clock(), final=True)

    def _reading(self, ref: VMRef) -> VMReading:
        reading = self._vms.get(ref.vm_id)
        if reading is None or reading.domain != ref.domain:
            reading = self._vms[ref.vm_id] = VMReading(ref.vm_id, ref.name, ref.owner, ref.domain)
        reading.name, reading.owner, reading.host = ref.name, ref.owner, ref.host
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
                select(VM.id, VM.name, VM.domain_name, User.name, VM.cpu, VM.host)
                .join(User, VM.owner_id == User.id)
                .where(VM.status != VMStatus.destroyed, VM.domain_name.is_not(None))
            ).all()
        prefix = self.domain_prefix
        index = {
            domain: VMRef(vm_id, name, owner, domain, cpu, host or DEFAULT_HOST)
            for vm_id, name, domain, owner, cpu, host in rows
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
        limits = self.limits
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
        if not event.domain.startswith(self.domain_prefix):
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
            host = self.host_reader.read(catalogue.clock())
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
        return vm_view(vm, r, known=reading is not None)

    def history(self, query: HistoryQuery) -> dict[str, Any]:
        """The points of one metric of the host or one VM in a window."""
        return read_history(self.store, query, catalogue.clock(), self.retention, self.interval)

    def max_window(self) -> float:
        """The longest window a history query may ask for: what the 1-hour tier keeps."""
        return self.retention.hour

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
        next_prune = loop.time() + self.prune_interval
        while True:
            started = loop.time()
            try:
                await self._in_thread(self.collect)
            except Exception:
                log.exception("metrics collection failed")
            if loop.time() >= next_slow:
                next_slow = loop.time() + self.slow_interval
                self._side(self.collect_slow, "slow")
            if loop.time() >= next_prune:
                next_prune = loop.time() + self.prune_interval
                self._side(self.prune, "prune")
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    def start(self) -> None:
        """Start the collector and the loop-lag probe on the running loop."""
        if self.backend is not None:
            self.backend.add_lifecycle_listener(self.on_lifecycle)
        # Its own thread: a slow libvirt read never takes a worker the API needs, and the fast
        # and slow reads take turns instead of fighting the event loop for the GIL.
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="twarga-metrics", initializer=background_priority
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
