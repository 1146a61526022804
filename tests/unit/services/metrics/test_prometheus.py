"""The Prometheus exposition of the current values: host gauges and counters in bytes,
one labelled sample per VM (a stopped VM is down with no usage), and the service's own
loop stall and collection times; the text parses with Prometheus' own parser."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from twarga_lab.services.metrics.probes import LoopLagProbe
from twarga_lab.services.metrics.prometheus import PrometheusExposition
from twarga_lab.services.metrics.readers import VMReading
from twarga_lab.virt.backend import DomainState

HOST = {
    "cpu": {"usage_percent": 12.5, "count": 8, "frequency_mhz": 2400.0},
    "memory": {
        "usage_percent": 50.0,
        "used_mb": 1024.0,
        "total_mb": 2048.0,
        "available_mb": 1024.0,
        "swap_percent": 1.5,
    },
    "disk": {
        "usage_percent": 40.0,
        "used_gb": 4.0,
        "total_gb": 10.0,
        "read_bytes": 111,
        "write_bytes": 222,
    },
    "network": {"bytes_sent": 333, "bytes_recv": 444},
}


class Snapshot:
    """What the exposition reads of the metrics service at scrape time."""

    def __init__(self, host: dict[str, Any] | None, readings: list[VMReading]) -> None:
        self.host, self.readings = host, readings
        self.probe = LoopLagProbe()
        self.last_collect_seconds = 0.004
        self.last_slow_seconds = 0.25

    def snapshot(self) -> tuple[dict[str, Any] | None, list[VMReading]]:
        return self.host, self.readings


def scrape(service: Snapshot) -> dict[str, dict[tuple, float]]:
    registry = CollectorRegistry()
    registry.register(PrometheusExposition(service))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_host_values_are_exposed_in_bytes():
    samples = scrape(Snapshot(HOST, []))
    assert samples["twarga_host_cpu_usage_percent"] == {(): 12.5}
    assert samples["twarga_host_cpu_count"] == {(): 8}
    assert samples["twarga_host_memory_total_bytes"] == {(): 2048 * 2**20}
    assert samples["twarga_host_disk_used_bytes"] == {(): 4 * 2**30}
    assert samples["twarga_host_swap_usage_percent"] == {(): 1.5}
    assert samples["twarga_host_disk_read_bytes_total"] == {(): 111}
    assert samples["twarga_host_network_received_bytes_total"] == {(): 444}
    assert samples["twarga_metrics_collect_seconds"] == {
        (("path", "fast"),): 0.004,
        (("path", "slow"),): 0.25,
    }


def test_each_vm_is_one_labelled_sample_and_a_stopped_one_is_down():
    web = VMReading(
        vm_id=7, name="web", owner="alice", domain="twarga-7-web", vcpus=2,
        state=DomainState.running, cpu_time_ns=3_500_000_000, cpu_usage=42.0,
        memory_used_kib=512 * 1024, memory_total_kib=1024 * 1024,
        disk_allocation_bytes=1, disk_capacity_bytes=4, net_rx_bytes=10, net_tx_bytes=20,
    )  # fmt: skip
    db = VMReading(
        vm_id=8, name="db", owner="bob", domain="twarga-8-db", state=DomainState.shutoff,
        cpu_usage=42.0, memory_used_kib=1024, memory_total_kib=2048,
    )  # fmt: skip
    samples = scrape(Snapshot(None, [web, db]))
    web_labels = (("host", "local"), ("owner", "alice"), ("vm", "web"), ("vm_id", "7"))
    db_labels = (("host", "local"), ("owner", "bob"), ("vm", "db"), ("vm_id", "8"))
    assert samples["twarga_vm_up"] == {web_labels: 1.0, db_labels: 0.0}
    assert samples["twarga_vm_cpu_usage_percent"] == {web_labels: 42.0, db_labels: 0.0}
    assert samples["twarga_vm_memory_usage_percent"] == {web_labels: 50.0, db_labels: 0.0}
    assert samples["twarga_vm_cpu_seconds_total"][web_labels] == 3.5
    assert samples["twarga_vm_memory_used_bytes"][web_labels] == 512 * 1024 * 1024
    assert samples["twarga_vm_disk_usage_percent"][web_labels] == 25.0
    assert samples["twarga_vm_network_sent_bytes_total"][web_labels] == 20
    assert samples["twarga_vm_vcpus"] == {web_labels: 2, db_labels: 1}
    # Without a host reading yet, no host families are exposed.
    assert not any(name.startswith("twarga_host_") for name in samples)


def test_the_loop_stall_is_the_probes_window_maximum():
    service = Snapshot(HOST, [])
    service.probe.record(0.75, at=1.0)
    service.probe.record(0.25, at=2.0)
    assert scrape(service)["twarga_event_loop_max_stall_seconds"] == {(): 0.75}
