"""Snapshots against the disk quota and the credits, through the API on libvirt's test
driver: an admin's disk quota fills up with snapshots (409 ``quota_exceeded``), ``/me``
shows ``snapshot_disk_gb``, deleting one frees it, and a meter tick charges them."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.helpers import wait_status
from twarga_lab.services.users import MILLI


@pytest.fixture
def twarga_config():
    # Running VMs cost nothing here: only the snapshots move the balance.
    return {"credits_per_vcpu_hour": 0.0, "credits_per_gb_ram_hour": 0.0}


async def create_running(api, name="snappy"):
    reply = await api("POST", "vms", body={"name": name})
    assert reply.status == 201, reply.json
    return await wait_status(api, reply.json["id"], "running")


async def test_snapshots_fill_the_disk_quota(api, twarga):
    vm = await create_running(api)
    disk = vm["disk"]
    quota = await api(
        "PATCH", "admin/users/alice/quota", user="admin", body={"max_disk_gb": 3 * disk}
    )
    assert quota.status == 200, quota.json
    base = f"vms/{vm['id']}/snapshots"
    for name in ("s1", "s2"):
        taken = await api("POST", base, body={"name": name})
        assert taken.status == 201, taken.json
    me = (await api("GET", "me")).json
    assert (me["usage"]["disk_gb"], me["usage"]["snapshot_disk_gb"]) == (disk, 2 * disk)
    users = {u["name"]: u for u in (await api("GET", "admin/users", user="admin")).json}
    assert users["alice"]["usage"]["snapshot_disk_gb"] == 2 * disk

    full = await api("POST", base, body={"name": "s3"})
    assert (full.status, full.json["reason"]) == (409, "quota_exceeded"), full.json
    assert f"quota of {3 * disk} GB" in full.json["message"]
    assert [s["name"] for s in (await api("GET", base)).json] == ["s1", "s2"]
    # A new VM sees the snapshots' GB as well.
    another = await api("POST", "vms", body={"name": "another"})
    assert (another.status, another.json["reason"]) == (409, "quota_exceeded"), another.json

    assert (await api("DELETE", f"{base}/s1")).status == 204
    assert (await api("GET", "me")).json["usage"]["snapshot_disk_gb"] == disk
    again = await api("POST", base, body={"name": "s3"})
    assert again.status == 201, again.json


async def test_a_meter_tick_charges_the_snapshots(api, twarga, monkeypatch):
    from twarga_lab.services import credits as credits_module

    vm = await create_running(api)
    base = f"vms/{vm['id']}/snapshots"
    assert (await api("POST", base, body={"name": "s1"})).status == 201
    meter = twarga.services.meter
    start = credits_module.utcnow() + timedelta(seconds=2)  # after the snapshot
    monkeypatch.setattr(credits_module, "utcnow", lambda: start)
    await meter.tick()
    before = (await api("GET", "me")).json["credits"]

    monkeypatch.setattr(credits_module, "utcnow", lambda: start + timedelta(hours=2))
    report = await meter.tick()
    # One snapshot of a `disk` GB VM, 2 hours, at the default 0.1 credits per GB-hour.
    expected = vm["disk"] * 2 * 0.1
    assert report.charged_milli == {"alice": round(expected * MILLI)}
    after = (await api("GET", "me")).json["credits"]
    assert after == pytest.approx(before - expected, abs=0.001)
    ledger = (await api("GET", "admin/users/alice/credits", user="admin")).json
    newest = ledger[0]
    assert newest["reason"] == f"snapshot storage: snappy/s1 {vm['disk']} GB 7200 s"
    assert newest["amount"] == pytest.approx(-expected, abs=0.001)

    # Without snapshots a tick costs nothing.
    assert (await api("DELETE", f"{base}/s1")).status == 204
    monkeypatch.setattr(credits_module, "utcnow", lambda: start + timedelta(hours=3))
    assert (await meter.tick()).charged_milli == {}
    assert (await api("GET", "me")).json["credits"] == pytest.approx(after, abs=0.001)
