"""A client written against the seed's (Twarga Cloud's) API keeps working: its create body
names the image ``os_type``, its metric history asks for ``metric_type``/``hours`` and the
seed's metric names, and relative times are seconds before now."""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.helpers import wait_for, wait_status


@pytest.fixture
def twarga_config():
    return {"metrics_interval": 0.2, "metrics_slow_interval": 0.2}


async def test_seed_create_body_with_os_type(api):
    body = {"name": "seed-1", "os_type": "twarga/tiny", "ram": 512, "cpu": 1, "disk": 10}
    reply = await api("POST", "vms", body=body)
    assert reply.status == 201, reply.json
    assert (reply.json["os_type"], reply.json["image"]) == ("twarga/tiny", "twarga/tiny")
    vm = await wait_status(api, reply.json["id"], "running")
    assert vm["os_type"] == "twarga/tiny"
    listed = (await api("GET", "vms")).json
    assert [v["os_type"] for v in listed] == ["twarga/tiny"]


async def test_os_type_and_image_may_agree_but_not_differ(api):
    same = {"name": "seed-2", "os_type": "twarga/tiny", "image": "twarga/tiny"}
    assert (await api("POST", "vms", body=same)).status == 201
    differ = {"name": "seed-3", "os_type": "ubuntu/focal64", "image": "twarga/tiny"}
    reply = await api("POST", "vms", body=differ)
    assert reply.status == 422, reply.json
    assert (reply.json["reason"], reply.json["field"]) == ("conflicting_fields", "os_type")
    unknown = await api("POST", "vms", body={"name": "seed-4", "os_type": "ubuntu/focal64"})
    assert unknown.status == 422
    assert (unknown.json["reason"], unknown.json["field"]) == ("unknown_image", "os_type")
    names = [v["name"] for v in (await api("GET", "vms")).json]
    assert names == ["seed-2"]  # nothing half-made by the refused bodies


async def history(api, **params):
    return await api("GET", "metrics/history", params={k: str(v) for k, v in params.items()})


async def wait_for_points(api, **params):
    async def points():
        reply = await history(api, **params)
        assert reply.status == 200, reply.json
        return reply.json if reply.json["points"] else None

    return await wait_for(points, timeout=30)


@pytest.mark.parametrize(
    ("seed_name", "ours"),
    [("cpu", "cpu_usage"), ("memory", "memory_usage"), ("disk", "disk_usage")],
)
async def test_seed_metric_names_map_to_ours(api, seed_name, ours):
    body = await wait_for_points(api, entity="host", metric=seed_name, since="-600")
    assert body["metric"] == ours
    assert body["unit"] == "%"
    seed_style = await wait_for_points(api, entity="host", metric_type=seed_name, hours=1)
    assert seed_style["metric"] == ours


async def test_network_reads_both_directions(api):
    body = await wait_for_points(api, entity="host", metric="network", hours=1)
    assert body["metric"] == "network"
    assert set(body["series"]) == {"net_sent_bytes_per_s", "net_recv_bytes_per_s"}
    sent = dict(map(tuple, body["series"]["net_sent_bytes_per_s"]))
    recv = dict(map(tuple, body["series"]["net_recv_bytes_per_s"]))
    for stamp, total in body["points"]:
        assert total == pytest.approx(sent.get(stamp, 0) + recv.get(stamp, 0), abs=0.01)


async def test_vm_history_by_the_seeds_vm_id(api):
    reply = await api("POST", "vms", body={"name": "seed-5", "os_type": "twarga/tiny"})
    vm = await wait_status(api, reply.json["id"], "running")
    # The test driver's guests run no CPU; their memory is read.
    body = await wait_for_points(api, vm_id=vm["id"], metric_type="memory", hours=1)
    assert (body["entity"], body["id"], body["metric"]) == ("vm", vm["id"], "memory_usage")
    other = await api(
        "GET", "metrics/history", user="bob", params={"vm_id": str(vm["id"]), "metric": "cpu"}
    )
    assert other.status == 404


async def test_bare_negative_since_is_seconds_before_now(api):
    body = (await history(api, entity="host", metric="cpu_usage", since="-300")).json
    since = datetime.fromisoformat(body["since"])
    until = datetime.fromisoformat(body["until"])
    assert (until - since).total_seconds() == pytest.approx(300, abs=1)
    assert since.year >= 2026  # not 1969


@pytest.mark.parametrize(
    ("params", "status", "reason", "field"),
    [
        ({"metric": "cpu", "hours": "1", "since": "-1h"}, 422, "conflicting_fields", "hours"),
        ({"metric": "cpu", "hours": "soon"}, 400, "bad_type", None),
        ({"metric": "cpu", "hours": "-2"}, 422, "bad_window", "hours"),
        ({"metric": "cpu", "hours": "24", "step": "1"}, 422, "too_many_points", "step"),
        ({"metric": "cpu", "since": "-90d", "step": "1"}, 422, "too_many_points", "step"),
    ],
)
async def test_seed_vocabulary_is_checked(api, params, status, reason, field):
    reply = await history(api, entity="host", **params)
    assert reply.status == status, reply.json
    assert reply.json["reason"] == reason
    assert reply.json.get("field") == field
