"""The Prometheus exposition of the current values."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from twarga_lab.services.metrics.catalogue import GB, MB
from twarga_lab.services.metrics.readers import VMReading
from twarga_lab.virt.backend import DomainState
from twarga_lab.virt.hosts import Host, HostPool, HostState

if TYPE_CHECKING:
    from twarga_lab.services.metrics.service import MetricsService


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
        labels = ["vm_id", "vm", "owner", "host"]

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
            values = [str(r.vm_id), r.name, r.owner, r.host]
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


class HypervisorCollector(Collector):
    """Per-host families of a :class:`~twarga_lab.virt.hosts.HostPool`, labelled ``host``:
    read from what the pool knows in memory (no libvirt call on a scrape)."""

    def __init__(self, pool: HostPool) -> None:
        self.pool = pool

    # (name, help, the host's value or None for no sample)
    FAMILIES: tuple[tuple[str, str, Callable[[HostPool, Host], float | None]], ...] = (
        ("up", "1 while the host's libvirtd answers.",
         lambda _p, h: 0.0 if h.state is HostState.down else 1.0),
        ("draining", "1 while the host takes no new VMs.",
         lambda _p, h: 1.0 if h.draining else 0.0),
        ("vcpus", "The host's CPUs.",
         lambda _p, h: h.known_capacity.vcpus if h.known_capacity else None),
        ("memory_bytes", "The host's RAM.",
         lambda _p, h: h.known_capacity.memory_mb * MB if h.known_capacity else None),
        ("domains", "Twarga's live domains placed on the host.",
         lambda p, h: len(p.domains_on(h.name))),
        ("cpu_usage_percent", "The host's CPU use (its libvirtd's reading).",
         lambda _p, h: h.stats.cpu_percent if h.stats else None),
        ("memory_available_bytes", "The host's free memory and page cache.",
         lambda _p, h: (
             h.stats.memory_available_mb * MB
             if h.stats and h.stats.memory_available_mb is not None else None
         )),
    )  # fmt: skip

    def collect(self) -> Iterator[Metric]:
        for name, doc, value_of in self.FAMILIES:
            family = GaugeMetricFamily(f"twarga_hypervisor_{name}", doc, labels=["host"])
            for host in self.pool.hosts.values():
                value = value_of(self.pool, host)
                if value is not None:
                    family.add_metric([host.name], float(value))
            yield family
