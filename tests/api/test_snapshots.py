"""VM snapshots through the API on libvirt's test driver: take, list, revert, delete,
ownership, validation, the per-VM quota, SOC events and destroy with snapshots."""

from __future__ import annotations

import jsonschema
import pytest
from sqlalchemy import select

from tests.helpers import wait_status
from twarga_lab.db.models import Event
from twarga_lab.event_schemas import load_schema


@pytest.fixture
def twarga_config():
    return {"max_snapshots_per_vm": 3}


async def create_running(api, name="snappy", user="alice"):
    reply = await api("POST", "vms", user=user, body={"name": name})
    assert reply.status == 201, reply.json
    return await wait_status(api, reply.json["id"], "running", user=user)


async def test_take_list_revert_and_delete(api, twarga):
    vm = await create_running(api)
    base = f"vms/{vm['id']}/snapshots"
    assert (await api("GET", base)).json == []

    taken = await api("POST", base, body={"name": "s1"})
    assert taken.status == 201, taken.json
    assert (taken.json["name"], taken.json["state"]) == ("s1", "running")
    assert taken.headers["Location"].endswith(f"/twarga/api/{base}/s1")

    # A stopped VM gets a disk-only snapshot.
    await api("POST", f"vms/{vm['id']}/action", body={"action": "force-stop"})
    await wait_status(api, vm["id"], "stopped")
    assert (await api("POST", base, body={"name": "s2"})).json["state"] == "shutoff"
    listed = (await api("GET", base)).json
    assert [(s["name"], s["state"]) for s in listed] == [("s1", "running"), ("s2", "shutoff")]
    assert all(s["created_at"] for s in listed)

    # Reverting to the running snapshot brings the VM back running.
    reverted = await api("POST", f"{base}/s1", body={"action": "revert"})
    assert reverted.status == 200, reverted.json
    assert reverted.json["status"] == "running"
    assert twarga.services.backend.state(vm["domain"]).value == "running"
    assert (await api("GET", f"vms/{vm['id']}")).json["status"] == "running"

    await twarga.services.vms.wait_idle()
    with twarga.services.db.session() as session:
        surprises = [
            e.message
            for e in session.scalars(select(Event).where(Event.vm_id == vm["id"]))
            if e.details.get("outside_twarga")
        ]
    assert surprises == []  # the revert's own lifecycle events are expected

    gone = await api("DELETE", f"{base}/s1")
    assert gone.status == 204
    assert [s["name"] for s in (await api("GET", base)).json] == ["s2"]
    missing = await api("DELETE", f"{base}/s1")
    assert (missing.status, missing.json["reason"]) == (404, "no_snapshot")
    missing = await api("POST", f"{base}/nope", body={"action": "revert"})
    assert (missing.status, missing.json["reason"]) == (404, "no_snapshot")


async def test_someone_elses_vm_has_no_snapshots_to_show(api):
    vm = await create_running(api)
    base = f"vms/{vm['id']}/snapshots"
    assert (await api("POST", base, body={"name": "mine"})).status == 201
    for method, path, body in [
        ("GET", base, None),
        ("POST", base, {"name": "theirs"}),
        ("POST", f"{base}/mine", {"action": "revert"}),
        ("DELETE", f"{base}/mine", None),
    ]:
        reply = await api(method, path, user="bob", body=body)
        assert (reply.status, reply.json["reason"]) == (404, "no_vm"), (method, path)
    # Nothing changed, and the admin sees it.
    listed = await api("GET", base, user="admin")
    assert [s["name"] for s in listed.json] == ["mine"]
    assert (await api("GET", "vms/999/snapshots")).status == 404


BAD = [
    # (raw body, status, reason)
    ("not json", 400, "bad_json"),
    ("{}", 400, "missing_field"),
    ('{"name": 7}', 400, "bad_type"),
    ('{"name": "s", "memory": true}', 400, "unknown_field"),
    ('{"name": "Snap"}', 422, "invalid_name"),
    ('{"name": ""}', 422, "invalid_name"),
    ('{"name": "1st"}', 422, "invalid_name"),
    ('{"name": "a</name><disks>"}', 422, "invalid_name"),
    ('{"name": "' + "a" * 64 + '"}', 422, "invalid_name"),
    ('{"name": "s\\n"}', 422, "invalid_name"),
]


@pytest.mark.parametrize(("raw", "status", "reason"), BAD)
async def test_bad_snapshot_requests_are_refused(api, twarga, raw, status, reason):
    vm = await create_running(api)
    reply = await api("POST", f"vms/{vm['id']}/snapshots", raw=raw)
    assert (reply.status, reply.json["reason"]) == (status, reason), reply.json
    assert set(reply.json) >= {"message", "reason"}
    assert twarga.services.backend.snapshots(vm["domain"]) == []


async def test_bad_actions_duplicates_and_quota(api):
    vm = await create_running(api)
    base = f"vms/{vm['id']}/snapshots"
    assert (await api("POST", base, body={"name": "s1"})).status == 201
    dup = await api("POST", base, body={"name": "s1"})
    assert (dup.status, dup.json["reason"]) == (409, "duplicate_name")
    bad = await api("POST", f"{base}/s1", body={"action": "explode"})
    assert (bad.status, bad.json["reason"]) == (422, "unknown_action")
    assert (await api("POST", f"{base}/s1", body={})).status == 400
    for name in ("s2", "s3"):
        assert (await api("POST", base, body={"name": name})).status == 201
    over = await api("POST", base, body={"name": "s4"})
    assert (over.status, over.json["reason"]) == (409, "quota_exceeded")
    assert len((await api("GET", base)).json) == 3
    # Deleting one frees a slot.
    assert (await api("DELETE", f"{base}/s2")).status == 204
    assert (await api("POST", base, body={"name": "s4"})).status == 201


async def test_a_vm_being_created_cannot_be_snapshotted(api, twarga):
    reply = await api("POST", "vms", body={"name": "fresh"})
    assert reply.json["status"] == "pending"
    early = await api("POST", f"vms/{reply.json['id']}/snapshots", body={"name": "s1"})
    assert (early.status, early.json["reason"]) == (409, "vm_pending")
    await twarga.services.vms.wait_idle()


async def test_every_snapshot_action_is_an_event(api, twarga):
    vm = await create_running(api)
    base = f"vms/{vm['id']}/snapshots"
    await api("POST", base, body={"name": "s1"})
    await api("POST", f"{base}/s1", body={"action": "revert"})
    await api("DELETE", f"{base}/s1")
    with twarga.services.db.session() as session:
        events = [
            (e.type, e.details.get("action"), e.details.get("snapshot"), e.user_name)
            for e in session.scalars(select(Event).where(Event.vm_id == vm["id"]))
            if e.details.get("actor") == "alice" and e.details.get("snapshot")
        ]
    assert events == [
        ("vm", "snapshot_create", "s1", "alice"),
        ("vm", "snapshot_revert", "s1", "alice"),
        ("vm", "snapshot_delete", "s1", "alice"),
    ]
    # The SOC log shows them to the admin, with the snapshot's name.
    soc = await api("GET", "soc/events", user="admin", params={"vm_id": str(vm["id"])})
    assert soc.status == 200, soc.json
    shown = {e["details"].get("action"): e for e in soc.json if e["details"].get("snapshot")}
    assert set(shown) == {"snapshot_create", "snapshot_revert", "snapshot_delete"}
    assert "s1" in shown["snapshot_revert"]["message"]
    for event in shown.values():
        jsonschema.validate(event, load_schema("vm"))


async def test_destroy_removes_a_vm_with_snapshots(api, twarga):
    vm = await create_running(api)
    base = f"vms/{vm['id']}/snapshots"
    for name in ("s1", "s2"):
        assert (await api("POST", base, body={"name": name})).status == 201
    assert (await api("DELETE", f"vms/{vm['id']}")).status == 204
    assert twarga.services.backend.state(vm["domain"]).value == "missing"
    assert twarga.services.backend.states(twarga.domain_prefix) == {}
    assert (await api("GET", base)).status == 404
