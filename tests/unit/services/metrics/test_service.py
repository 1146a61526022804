"""The collector's pieces: host readings against psutil, VM readings from libvirt's test
driver, threshold events, the Prometheus exposition and the loop-lag probe."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import libvirt
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from twarga_lab.db import Database
from twarga_lab.db.models import VM, Event, User, VMStatus
from twarga_lab.services import metrics as metrics_module
from twarga_lab.services.metrics import (
    HostReader,
    LoopLagProbe,
    MetricsService,
)
from twarga_lab.virt.backend import DomainState
from twarga_lab.virt.libvirt_backend import LibvirtBackend
from twarga_lab.virt.stats import FastStats, parse_facts, parse_slow

QEMU_SLOW_RECORD = {
    # What qemu:///system answered for a tiny guest (trimmed).
    "balloon.current": 262144,
    "balloon.maximum": 262144,
    "balloon.unused": 189904,
    "balloon.available": 223612,
    "balloon.rss": 244984,
    "net.count": 0,
    "block.count": 1,
    "block.0.name": "vda",
    "block.0.rd.bytes": 4608,
    "block.0.wr.bytes": 1024,
    "block.0.allocation": 2 * 2**30,
    "block.0.capacity": 10 * 2**30,
}


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'metrics.db'}").open()
    yield database
    database.dispose()


def test_host_readings_agree_with_psutil(tmp_path):
    host = HostReader(tmp_path).read(time.time())
    assert host["cpu"]["count"] == psutil.cpu_count()
    assert 0.0 <= host["cpu"]["usage_percent"] <= 100.0
    total_mb = psutil.virtual_memory().total / 2**20
    assert host["memory"]["total_mb"] == pytest.approx(total_mb, rel=0.01)
    assert 0.0 < host["memory"]["usage_percent"] < 100.0
    disk = psutil.disk_usage(str(tmp_path))
    assert host["disk"]["total_gb"] == pytest.approx(disk.total / 2**30, rel=0.01)
    assert host["network"]["bytes_recv"] >= psutil.net_io_counters().bytes_recv * 0.99
    assert host["disk"]["read_bytes_per_s"] >= 0 and host["network"]["sent_mbps"] >= 0


def test_slow_records_and_domain_xml_are_parsed():
    slow = parse_slow("d", QEMU_SLOW_RECORD)
    assert slow.memory_used_kib == 223612 - 189904  # the guest's own view
    assert slow.memory_total_kib == 223612
    assert (slow.disk_read_bytes, slow.disk_write_bytes) == (4608, 1024)
    assert slow.disk_capacity_bytes == 10 * 2**30
    no_guest_stats = parse_slow("d", {"balloon.current": 1000, "balloon.rss": 1500})
    assert no_guest_stats.memory_used_kib == 1000  # QEMU's RSS, capped at the balloon
    facts = parse_facts(
        "<domain><vcpu current='2'>4</vcpu><memory unit='MiB'>512</memory><devices>"
        "<disk><target dev='vda'/></disk><interface><target dev='vnet0'/></interface>"
        "</devices></domain>"
    )
    assert (facts.vcpus, facts.memory_kib, facts.disks, facts.nics) == (
        2,
        524288,
        ("vda",),
        ("vnet0",),
    )


def test_cpu_usage_comes_from_cpu_time_deltas_per_vcpu(db):
    service = MetricsService(db, None, domain_prefix="twarga-", disk_path=Path("/"))
    reading = metrics_module.VMReading(1, "web", "alice", "d")
    running = DomainState.running
    assert reading.apply_fast(FastStats("d", running, 10_000_000_000), 2, 100.0) is None
    # 10 s of wall time, 2 vCPUs, 5 s of CPU: a quarter of the VM's capacity.
    assert reading.apply_fast(FastStats("d", running, 15_000_000_000), 2, 110.0) == 25.0
    # A restart resets CPU time: no negative usage.
    assert reading.apply_fast(FastStats("d", running, 1_000_000), 2, 120.0) is None
    assert service.reader is None


def add_vm(db: Database, domain: str, owner: str = "alice") -> int:
    with db.session() as session:
        user = session.scalar(select(User).where(User.name == owner)) or User(name=owner)
        session.add(user)
        session.flush()
        vm = VM(
            owner_id=user.id,
            name="web-1",
            domain_name=domain,
            image="twarga/tiny",
            os_type="linux",
            ram_mb=512,
            cpu=1,
            disk_gb=10,
            status=VMStatus.running,
            ip_address="10.0.2.15",
        )
        session.add(vm)
        session.flush()
        return vm.id


def events(db: Database) -> list[Event]:
    with db.session() as session:
        return list(session.scalars(select(Event).order_by(Event.id)))


def test_a_threshold_crossing_and_recovery_give_exactly_two_events(db, monkeypatch):
    service = MetricsService(
        db, None, domain_prefix="twarga-", disk_path=Path("/"), cpu_threshold=80.0,
        threshold_seconds=30.0,
    )  # fmt: skip
    host_cpu = ("host", 0, "cpu_usage")
    # Above for 20 s only: no event. Above for 30 s: one warning, however long it stays.
    # Below for 10 s then above again: still the same alarm. Below for 30 s: one info.
    series = [95, 95, 95, 70, 95, 95, 95, 95, 99, 99, 60, 95, 60, 60, 60, 60, 50, 50]
    for i, value in enumerate(series):
        service._check_thresholds({host_cpu: float(value)}, 1000.0 + 10 * i)
    recorded = events(db)
    assert [(e.type, e.severity) for e in recorded] == [("system", "warning"), ("system", "info")]
    warning, info = recorded
    assert warning.details["metric"] == "cpu_usage"
    assert warning.details["threshold"] == 80.0
    assert warning.details["value"] == 95.0
    assert "above 80%" in warning.message
    assert info.details["value"] == 60.0


def test_vm_threshold_events_name_the_vm_and_its_owner(db):
    backend = LibvirtBackend("test:///default")
    prefix = f"tm{uuid.uuid4().hex[:6]}-"
    vm_id = add_vm(db, f"{prefix}1-web-1")
    service = MetricsService(
        db, backend, domain_prefix=prefix, disk_path=Path("/"), memory_threshold=50,
        threshold_seconds=0,
    )  # fmt: skip
    service._refresh_vm_index(0.0, {})
    service._check_thresholds({("vm", vm_id, "memory_usage"): 75.0}, 1.0)
    service._check_thresholds({("vm", vm_id, "memory_usage"): 20.0}, 2.0)
    recorded = events(db)
    assert [(e.type, e.severity, e.vm_id, e.user_name) for e in recorded] == [
        ("vm", "warning", vm_id, "alice"),
        ("vm", "info", vm_id, "alice"),
    ]
    assert recorded[0].message.startswith("VM web-1 memory usage is 75.0%")
    backend.close()


@pytest.fixture
def test_domain():
    """A running domain of our own on the process-wide test driver."""
    conn = libvirt.open("test:///default")
    prefix = f"tp{uuid.uuid4().hex[:6]}-"
    name = f"{prefix}1-web-1"
    dom = conn.defineXML(
        f"<domain type='test'><name>{name}</name><memory>524288</memory><vcpu>2</vcpu>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )
    dom.create()
    yield prefix, name
    dom.destroy()
    dom.undefine()
    conn.close()


def test_the_prometheus_exposition_parses(db, tmp_path, test_domain):
    prefix, name = test_domain
    vm_id = add_vm(db, name)
    backend = LibvirtBackend("test:///default")
    service = MetricsService(db, backend, domain_prefix=prefix, disk_path=tmp_path)
    service.open()
    service.collect()
    service.collect_slow()
    service.probe.record(0.004, time.monotonic())
    families = {
        f.name: f for f in text_string_to_metric_families(service.prometheus_text().decode())
    }
    assert families["twarga_host_cpu_count"].samples[0].value == psutil.cpu_count()
    assert families["twarga_host_network_received_bytes"].type == "counter"
    assert families["twarga_event_loop_max_stall_seconds"].samples[0].value == 0.004
    (up,) = families["twarga_vm_up"].samples
    assert up.labels == {"vm_id": str(vm_id), "vm": "web-1", "owner": "alice", "host": "local"}
    assert up.value == 1.0
    (vcpus,) = families["twarga_vm_vcpus"].samples
    assert vcpus.value == 2  # from the domain XML, read once
    assert families["twarga_vm_cpu_seconds"].type == "counter"
    backend.close()


async def test_the_loop_lag_probe_sees_a_blocked_loop():
    probe = LoopLagProbe(interval=0.01)
    probe.start()
    await asyncio.sleep(0.05)
    quiet = probe.max_stall()
    time.sleep(0.08)  # blocks the event loop on purpose
    await asyncio.sleep(0.03)
    await probe.stop()
    assert quiet < 0.05
    assert probe.max_stall() >= 0.06
    assert probe.max_since_reset >= 0.06
