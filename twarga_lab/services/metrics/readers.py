"""Readers: the host from psutil, and what the collector knows of each VM."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from twarga_lab.db.models import VMStatus
from twarga_lab.services.metric_store import (
    SeriesKey,
)
from twarga_lab.services.metrics.catalogue import GB, MB, clock, iso
from twarga_lab.virt.backend import DomainState
from twarga_lab.virt.stats import FastStats, SlowStats

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
    host: str = "local"  # the hypervisor host it runs on (``TwargaLabApp.hosts``)
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
class VMRef:
    vm_id: int
    name: str
    owner: str
    domain: str
    cpu: int
    host: str = "local"


def vm_view(vm: dict[str, Any], r: VMReading, known: bool) -> dict[str, Any]:
    """``GET /metrics/vm/{id}``: the reading ``r`` of ``vm`` (a ``VMService.get`` view);
    ``known`` is False when the collector has not read the VM yet."""
    running = vm["status"] == VMStatus.running.value
    return {
        "vm_id": vm["id"],
        "name": vm["name"],
        "status": vm["status"],
        "cpu_usage": r.cpu_usage if running else 0.0,
        "cpu_time_seconds": round((r.cpu_time_ns or 0) / 1e9, 3),
        "vcpus": r.vcpus if known else vm["cpu"],
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
