"""Readers: the host reading's shape and rates, the stored host series, and a VM's CPU,
memory, disk and network derived from successive fast and slow readings."""

from __future__ import annotations

import psutil
import pytest

from twarga_lab.services.metrics.readers import HostReader, VMReading, host_samples, vm_view
from twarga_lab.virt.backend import DomainState
from twarga_lab.virt.stats import FastStats, SlowStats

GIB_KIB = 1024 * 1024


def test_a_host_reading_has_the_api_shape_and_its_stored_series(tmp_path):
    reader = HostReader(tmp_path / "not" / "made" / "yet")
    reading = reader.read(1_800_000_000.0)
    assert set(reading) == {"cpu", "memory", "disk", "network", "timestamp"}
    assert reading["timestamp"] == "2027-01-15T08:00:00+00:00"
    assert 0.0 <= reading["cpu"]["usage_percent"] <= 100.0
    assert reading["cpu"]["count"] == psutil.cpu_count(logical=True)
    # A missing folder is measured on its nearest existing parent.
    assert reading["disk"]["path"] == str(tmp_path / "not" / "made" / "yet")
    assert reading["disk"]["total_gb"] == round(psutil.disk_usage(str(tmp_path)).total / 2**30, 2)
    assert reading["network"]["sent_bytes_per_s"] >= 0
    samples = host_samples(reading)
    assert samples[("host", 0, "cpu_usage")] == reading["cpu"]["usage_percent"]
    assert samples[("host", 0, "swap_usage")] == reading["memory"]["swap_percent"]
    assert samples[("host", 0, "net_recv_bytes_per_s")] == reading["network"]["recv_bytes_per_s"]
    assert {key[2] for key in samples} == {
        "cpu_usage",
        "memory_usage",
        "swap_usage",
        "disk_usage",
        "disk_read_bytes_per_s",
        "disk_write_bytes_per_s",
        "net_sent_bytes_per_s",
        "net_recv_bytes_per_s",
    }


def reading() -> VMReading:
    return VMReading(vm_id=7, name="web", owner="alice", domain="twarga-7-web")


def running(cpu_ns: int | None) -> FastStats:
    return FastStats("twarga-7-web", DomainState.running, cpu_ns)


def test_cpu_usage_is_the_cpu_time_delta_over_the_interval_and_vcpus():
    r = reading()
    assert r.apply_fast(running(10_000_000_000), vcpus=2, now=100.0) is None  # no baseline
    # 10 s of wall time, 2 vCPUs: 5 s of CPU time is 25 %.
    assert r.apply_fast(running(15_000_000_000), vcpus=2, now=110.0) == 25.0
    assert r.cpu_usage == 25.0 and r.vcpus == 2 and r.updated_at == 110.0
    # More CPU time than the interval allows is capped at 100 %.
    assert r.apply_fast(running(60_000_000_000), vcpus=2, now=120.0) == 100.0


def test_a_restarted_or_stopped_domain_gives_no_cpu_usage():
    r = reading()
    r.apply_fast(running(50_000_000_000), vcpus=1, now=100.0)
    assert r.apply_fast(running(1_000_000_000), vcpus=1, now=110.0) is None  # restarted
    assert r.apply_fast(running(2_000_000_000), vcpus=1, now=120.0) == 10.0
    stopped = FastStats("twarga-7-web", DomainState.shutoff, None)
    assert r.apply_fast(stopped, vcpus=1, now=130.0) is None
    assert r.cpu_usage == 0.0 and r.state is DomainState.shutoff
    assert r.apply_fast(running(3_000_000_000), vcpus=1, now=140.0) is None


def slow(**counters: int) -> SlowStats:
    return SlowStats(
        "twarga-7-web",
        memory_current_kib=GIB_KIB,
        memory_available_kib=GIB_KIB,
        memory_unused_kib=GIB_KIB // 4,
        disk_allocation_bytes=1 * 2**30,
        disk_capacity_bytes=4 * 2**30,
        **counters,
    )


def test_slow_readings_give_usage_and_rates_from_the_second_one():
    r = reading()
    first = r.apply_slow(slow(disk_read_bytes=1000, net_rx_bytes=500), now=100.0)
    assert first == {"memory_usage": 75.0, "disk_usage": 25.0}
    second = r.apply_slow(
        slow(disk_read_bytes=3000, disk_write_bytes=400, net_rx_bytes=100, net_tx_bytes=800),
        now=110.0,
    )
    assert second == {
        "memory_usage": 75.0,
        "disk_usage": 25.0,
        "disk_read_bytes_per_s": 200.0,
        "disk_write_bytes_per_s": 40.0,
        "net_recv_bytes_per_s": 0.0,  # the counter went back (a new NIC): no negative rate
        "net_sent_bytes_per_s": 80.0,
    }
    assert r.memory_used_kib == 3 * GIB_KIB // 4 and r.disk_read_bytes == 3000


def test_usage_without_totals_is_zero():
    r = reading()
    assert r.memory_usage == 0.0 and r.disk_usage == 0.0


def vm(status: str) -> dict:
    return {
        "id": 7,
        "name": "web",
        "status": status,
        "cpu": 2,
        "ram": 512,
        "disk": 4,
        "uptime": 42,
        "ip_address": "192.168.122.10",
    }


def test_the_vm_view_of_a_running_vm_and_of_a_stopped_one():
    r = reading()
    r.apply_fast(running(0), vcpus=2, now=100.0)
    r.apply_fast(running(4_000_000_000), vcpus=2, now=110.0)
    r.apply_slow(slow(), now=100.0)
    r.apply_slow(slow(disk_read_bytes=5000), now=110.0)
    view = vm_view(vm("running"), r, known=True)
    assert view["cpu_usage"] == 20.0 and view["cpu_time_seconds"] == 4.0
    assert view["memory_usage"] == 75.0 and view["memory_total_mb"] == 1024.0
    assert view["disk_read_bytes_per_s"] == 500.0 and view["disk_total_gb"] == 4.0
    assert (view["vm_id"], view["ip"], view["uptime"]) == (7, "192.168.122.10", 42)
    assert view["timestamp"] == "1970-01-01T00:01:50+00:00"
    off = vm_view(vm("stopped"), r, known=True)
    assert off["cpu_usage"] == 0.0 and off["memory_usage"] == 0.0
    assert off["disk_read_bytes_per_s"] == 0.0 and off["disk_read_bytes"] == 5000


def test_a_vm_not_read_yet_shows_its_configured_sizes():
    view = vm_view(vm("running"), reading(), known=False)
    assert (view["vcpus"], view["memory_total_mb"], view["disk_total_gb"]) == (2, 512, 4)
    assert view["cpu_usage"] == 0.0


@pytest.mark.parametrize("status", ["running", "stopped"])
def test_the_vm_view_has_the_api_fields(status):
    assert set(vm_view(vm(status), reading(), known=False)) == {
        "vm_id", "name", "status", "cpu_usage", "cpu_time_seconds", "vcpus",
        "memory_usage", "memory_used_mb", "memory_total_mb", "disk_usage", "disk_used_gb",
        "disk_total_gb", "disk_read_bytes", "disk_write_bytes", "disk_read_bytes_per_s",
        "disk_write_bytes_per_s", "network_rx_bytes", "network_tx_bytes",
        "network_rx_bytes_per_s", "network_tx_bytes_per_s", "uptime", "ip", "timestamp",
    }  # fmt: skip
