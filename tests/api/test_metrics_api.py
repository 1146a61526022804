"""The metrics API on libvirt's test driver: shapes, history and its validation, ownership,
and the Prometheus exposition behind its scrape token."""

from __future__ import annotations

from datetime import datetime

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_for, wait_status

SCRAPE_TOKEN = "scrape-secret-for-tests"


@pytest.fixture
def twarga_config():
    return {
        "metrics_interval": 0.2,
        "metrics_slow_interval": 0.2,
        "metrics_scrape_token": SCRAPE_TOKEN,
    }


async def create_running(api, name="mon-1", user="alice"):
    reply = await api("POST", "vms", user=user, body={"name": name})
    assert reply.status == 201, reply.json
    return await wait_status(api, reply.json["id"], "running", user=user)


async def history(api, user="alice", **params):
    return await api(
        "GET", "metrics/history", user=user, params={k: str(v) for k, v in params.items()}
    )


async def test_host_metrics_have_the_seed_shape(api):
    reply = await api("GET", "metrics/host")
    assert reply.status == 200, reply.json
    host = reply.json
    assert set(host) >= {"cpu", "memory", "disk", "network", "timestamp"}
    assert set(host["cpu"]) >= {"usage_percent", "count", "frequency_mhz"}
    assert set(host["memory"]) >= {
        "usage_percent",
        "used_mb",
        "total_mb",
        "available_mb",
        "swap_percent",
    }
    assert set(host["disk"]) >= {
        "usage_percent",
        "used_gb",
        "total_gb",
        "free_gb",
        "read_bytes_per_s",
        "write_bytes_per_s",
    }
    assert set(host["network"]) >= {"bytes_sent", "bytes_recv", "sent_mbps", "recv_mbps"}
    assert host["cpu"]["count"] == psutil.cpu_count()
    assert 0 <= host["cpu"]["usage_percent"] <= 100
    assert host["memory"]["total_mb"] == pytest.approx(psutil.virtual_memory().total / 2**20, 0.01)
    datetime.fromisoformat(host["timestamp"])


async def test_vm_metrics_have_the_seed_shape(api):
    vm = await create_running(api)

    async def seen():
        reply = await api("GET", f"metrics/vm/{vm['id']}")
        assert reply.status == 200, reply.json
        return reply.json if reply.json["memory_total_mb"] else None

    metrics = await wait_for(seen, timeout=10)
    assert set(metrics) >= {
        "vm_id",
        "cpu_usage",
        "memory_usage",
        "disk_usage",
        "uptime",
        "ip",
        "disk_read_bytes",
        "disk_write_bytes",
        "disk_read_bytes_per_s",
        "disk_write_bytes_per_s",
        "network_rx_bytes",
        "network_tx_bytes",
        "network_rx_bytes_per_s",
        "network_tx_bytes_per_s",
        "timestamp",
    }
    assert metrics["vm_id"] == vm["id"]
    assert metrics["ip"] == vm["ip_address"]
    assert metrics["status"] == "running"
    assert metrics["uptime"] >= 0
    assert 0 <= metrics["cpu_usage"] <= 100


async def test_someone_elses_vm_is_not_found_and_an_admin_sees_every_vm(api):
    vm = await create_running(api, user="alice")
    assert (await api("GET", f"metrics/vm/{vm['id']}", user="bob")).status == 404
    reply = await history(api, user="bob", entity="vm", id=vm["id"], metric="cpu_usage")
    assert reply.status == 404, reply.json
    assert reply.json["reason"] == "no_vm"
    assert (await api("GET", f"metrics/vm/{vm['id']}", user="admin")).status == 200
    reply = await history(api, user="admin", entity="vm", id=vm["id"], metric="cpu_usage")
    assert reply.status == 200, reply.json
    assert (await api("GET", "metrics/vm/999999")).status == 404


async def test_history_of_the_host_and_a_vm_returns_points(api, twarga):
    vm = await create_running(api)
    metrics = twarga.services.metrics
    start = metrics.ticks

    async def ticked_twice():
        return metrics.ticks >= start + 2

    await wait_for(ticked_twice, timeout=10)
    reply = await history(api, entity="host", metric="cpu_usage", since="-10m")
    assert reply.status == 200, reply.json
    body = reply.json
    assert (body["entity"], body["id"], body["metric"], body["resolution"]) == (
        "host",
        None,
        "cpu_usage",
        "raw",
    )
    assert len(body["points"]) >= 2
    stamp, value = body["points"][-1]
    assert datetime.fromisoformat(stamp).tzinfo is not None
    assert 0 <= value <= 100

    async def vm_points():
        reply = await history(api, entity="vm", id=vm["id"], metric="memory_usage")
        assert reply.status == 200, reply.json
        return reply.json["points"]

    assert await wait_for(vm_points, timeout=10)

    # A day without a step reads 1-minute rollups; a week with a step of an hour, 1-hour ones.
    day = await history(api, entity="host", metric="memory_usage", since="-24h")
    assert day.json["resolution"] == "1m"
    assert day.json["points"], "the open minute is rolled up on the fly"
    week = await history(api, entity="host", metric="memory_usage", since="-7d", step=3600)
    assert week.json["resolution"] == "1h"


HISTORY_ERRORS = [
    # (params, status, reason, field)
    ({}, 400, "missing_field", None),
    ({"entity": "disk", "metric": "cpu_usage"}, 422, "bad_entity", "entity"),
    ({"entity": "vm", "metric": "cpu_usage"}, 400, "missing_field", None),
    ({"entity": "vm", "id": "abc", "metric": "cpu_usage"}, 400, "bad_type", None),
    ({"entity": "host"}, 400, "missing_field", None),
    ({"entity": "host", "metric": "temperature"}, 422, "unknown_metric", "metric"),
    ({"entity": "host", "metric": "cpu_usage", "since": "yesterday"}, 400, "bad_type", None),
    (
        {"entity": "host", "metric": "cpu_usage", "since": "-1h", "until": "-2h"},
        422,
        "bad_window",
        "since",
    ),
    ({"entity": "host", "metric": "cpu_usage", "since": "-400d"}, 422, "window_too_long", "since"),
    ({"entity": "host", "metric": "cpu_usage", "step": "0"}, 422, "bad_step", "step"),
    ({"entity": "host", "metric": "cpu_usage", "step": "fast"}, 400, "bad_type", None),
]


@pytest.mark.parametrize(("params", "status", "reason", "field"), HISTORY_ERRORS)
async def test_history_validation(api, params, status, reason, field):
    reply = await history(api, **params)
    assert reply.status == status, reply.json
    assert reply.json["reason"] == reason
    assert reply.json.get("field") == field
    assert reply.json["message"]


async def scrape(jp_fetch, authorization: str):
    headers = {"Authorization": authorization} if authorization else {}
    return await jp_fetch("twarga", "metrics", headers=headers, raise_error=False)


async def test_prometheus_needs_the_scrape_token_or_an_admin(api, jp_fetch, twarga):
    vm = await create_running(api)

    async def vm_exported():
        return any(r.vm_id == vm["id"] for r in twarga.services.metrics.snapshot()[1])

    await wait_for(vm_exported, timeout=10)
    anonymous = await scrape(jp_fetch, "")
    assert anonymous.code == 401
    assert anonymous.headers["Content-Type"].startswith("application/json")
    assert (await scrape(jp_fetch, "Bearer wrong-token")).code == 401
    assert (await scrape(jp_fetch, "token alice-token")).code == 403

    reply = await scrape(jp_fetch, f"Bearer {SCRAPE_TOKEN}")
    assert reply.code == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    assert families["twarga_host_cpu_count"].samples[0].value == psutil.cpu_count()
    assert "twarga_event_loop_max_stall_seconds" in families
    assert families["twarga_vm_cpu_seconds"].type == "counter"
    up = {s.labels["vm_id"]: s for s in families["twarga_vm_up"].samples}
    assert up[str(vm["id"])].labels == {
        "vm_id": str(vm["id"]),
        "vm": "mon-1",
        "owner": "alice",
        "host": "local",
    }
    assert up[str(vm["id"])].value == 1.0

    admin = await scrape(jp_fetch, "token admin-token")
    assert admin.code == 200


async def test_without_a_scrape_token_only_admins_may_scrape(jp_fetch, twarga):
    metrics = twarga.services.metrics
    metrics.scrape_token = ""
    assert (await scrape(jp_fetch, "Bearer ")).code == 401
    assert (await scrape(jp_fetch, f"Bearer {SCRAPE_TOKEN}")).code == 401
    assert (await scrape(jp_fetch, "token alice-token")).code == 403
    assert (await scrape(jp_fetch, "token admin-token")).code == 200
