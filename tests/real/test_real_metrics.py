"""Metrics of a real guest on qemu:///system, read through the API: CPU time and uptime
grow from one collector tick to the next, counters come from libvirt's bulk statistics,
and the history holds the points."""

from __future__ import annotations

import pytest

from tests.helpers import wait_for, wait_status

pytestmark = pytest.mark.real
BOOT_TIMEOUT = 90


@pytest.fixture
def twarga_config(real_settings) -> dict:
    return real_settings(23100, metrics_interval=1.0, metrics_slow_interval=2.0)


async def test_a_real_guest_reports_growing_cpu_time_and_uptime(api, twarga, cleanup_domains):
    reply = await api("POST", "vms", body={"name": "metered", "ram": 512})
    assert reply.status == 201, reply.json
    vm = reply.json
    await wait_status(api, vm["id"], "running", timeout=BOOT_TIMEOUT)

    async def reading(after: dict | None = None) -> dict | None:
        got = await api("GET", f"metrics/vm/{vm['id']}")
        assert got.status == 200, got.json
        m = got.json
        if m["cpu_time_seconds"] <= 0 or not m["memory_total_mb"]:
            return None
        if after is not None and m["timestamp"] == after["timestamp"]:
            return None  # the same tick
        return m

    first = await wait_for(reading, timeout=30, interval=0.2)
    second = await wait_for(lambda: reading(first), timeout=30, interval=0.2)
    assert second["cpu_time_seconds"] > first["cpu_time_seconds"]
    assert second["uptime"] >= first["uptime"]
    third = await wait_for(lambda: reading(second), timeout=30, interval=0.2)
    assert third["uptime"] > first["uptime"]
    assert 0 <= third["cpu_usage"] <= 100
    # The guest reports its own memory through the virtio balloon; libvirt knows the disk.
    assert 0 < third["memory_used_mb"] <= third["memory_total_mb"] <= 512
    assert third["disk_total_gb"] == pytest.approx(10, abs=0.01)
    assert third["ip"] == "10.0.2.15"

    async def points(metric: str) -> list | None:
        got = await api(
            "GET",
            "metrics/history",
            params={"entity": "vm", "id": str(vm["id"]), "metric": metric, "since": "-10m"},
        )
        assert got.status == 200, got.json
        return got.json["points"] if len(got.json["points"]) >= 2 else None

    cpu = await wait_for(lambda: points("cpu_usage"), timeout=30, interval=0.5)
    assert all(0 <= value <= 100 for _, value in cpu)
    assert await wait_for(lambda: points("memory_usage"), timeout=30, interval=0.5)
    assert (await api("DELETE", f"vms/{vm['id']}")).status == 204
