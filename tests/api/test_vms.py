"""The VM API on libvirt's test driver: create, validation, quotas, idempotent actions,
ownership and reconciliation."""

from __future__ import annotations

import asyncio

import libvirt
import pytest
from sqlalchemy import select

from tests.helpers import wait_for, wait_status
from twarga_lab.db.models import VM, Event


async def create_running(api, name="web-1", user="alice", **extra):
    reply = await api("POST", "vms", user=user, body={"name": name, **extra})
    assert reply.status == 201, reply.json
    return await wait_status(api, reply.json["id"], "running", user=user)


async def test_create_answers_pending_then_runs(api, twarga):
    reply = await api("POST", "vms", body={"name": "web-1", "ram": 1024, "cpu": 2, "disk": 20})
    assert reply.status == 201, reply.json
    vm = reply.json
    assert vm["status"] in ("pending", "running")
    assert reply.headers["Location"].endswith(f"/twarga/api/vms/{vm['id']}")
    for key in (
        "id",
        "name",
        "status",
        "os_type",
        "ram",
        "cpu",
        "disk",
        "ip_address",
        "created_at",
        "uptime",
        "domain",
        "ssh_port",
    ):
        assert key in vm, key
    # As in the seed, os_type is the image the VM was made from.
    assert (vm["ram"], vm["cpu"], vm["disk"], vm["os_type"]) == (1024, 2, 20, "twarga/tiny")
    assert vm["os_family"] == "linux"
    assert vm["domain"].startswith(twarga.domain_prefix)
    running = await wait_status(api, vm["id"], "running")
    state = twarga.services.backend.state(vm["domain"])
    assert state.value == "running"
    disk = twarga.services.vms.instance_dir(vm["domain"]) / "disk.qcow2"
    from twarga_lab.virt.images import virtual_size_bytes

    assert virtual_size_bytes(disk) == 20 * 2**30
    listed = (await api("GET", "vms")).json
    assert [v["id"] for v in listed] == [running["id"]]


async def test_defaults_fill_in_missing_sizes(api):
    vm = await create_running(api, "small")
    assert (vm["ram"], vm["cpu"], vm["disk"], vm["image"]) == (512, 1, 10, "twarga/tiny")


BAD_BODIES = [
    # (raw body, status, reason, field)
    ("not json", 400, "bad_json", None),
    ("[1, 2]", 400, "bad_body", None),
    ("{}", 400, "missing_field", None),
    ('{"name": "a", "colour": "red"}', 400, "unknown_field", None),
    ('{"name": 7}', 400, "bad_type", None),
    ('{"name": "a", "ram": "big"}', 400, "bad_type", None),
    ('{"name": "a", "ram": 1024.5}', 400, "bad_type", None),
    ('{"name": "a", "cpu": true}', 400, "bad_type", None),
    ('{"name": "Web"}', 422, "invalid_name", "name"),
    ('{"name": "a</name><devices>"}', 422, "invalid_name", "name"),
    ('{"name": ""}', 422, "invalid_name", "name"),
    ('{"name": "1web"}', 422, "invalid_name", "name"),
    ('{"name": "web_1"}', 422, "invalid_name", "name"),
    ('{"name": "' + "a" * 64 + '"}', 422, "invalid_name", "name"),
    # `$` under re.match also matches before a trailing newline: names are matched whole.
    ('{"name": "web\\n"}', 422, "invalid_name", "name"),
    ('{"name": "a", "image": "twarga/tiny\\n"}', 422, "unknown_image", "image"),
    ('{"name": "a", "ram": 256}', 422, "out_of_range", "ram"),
    ('{"name": "a", "ram": 4097}', 422, "out_of_range", "ram"),
    ('{"name": "a", "cpu": 0}', 422, "out_of_range", "cpu"),
    ('{"name": "a", "cpu": 5}', 422, "out_of_range", "cpu"),
    ('{"name": "a", "disk": 9}', 422, "out_of_range", "disk"),
    ('{"name": "a", "disk": 101}', 422, "out_of_range", "disk"),
    ('{"name": "a", "image": "no/such"}', 422, "unknown_image", "image"),
    ('{"name": "a", "image": "../../etc"}', 422, "unknown_image", "image"),
]


@pytest.mark.parametrize(("raw", "status", "reason", "field"), BAD_BODIES)
async def test_bad_create_is_refused_and_changes_nothing(api, twarga, raw, status, reason, field):
    reply = await api("POST", "vms", raw=raw)
    assert reply.status == status, reply.json
    assert reply.json["reason"] == reason
    assert reply.json["message"]
    if field:
        assert reply.json["field"] == field
    assert (await api("GET", "vms")).json == []
    assert twarga.services.backend.states(twarga.domain_prefix) == {}


async def test_xml_in_a_name_never_reaches_libvirt(api, twarga):
    reply = await api("POST", "vms", body={"name": "x</name><devices><disk/>"})
    assert reply.status == 422
    conn = libvirt.open("test:///default")
    assert not any("devices" in d.name() for d in conn.listAllDomains())


async def test_duplicate_name_is_a_conflict(api):
    await create_running(api, "web")
    reply = await api("POST", "vms", body={"name": "web"})
    assert (reply.status, reply.json["reason"]) == (409, "name_taken")
    # Another user may use the same name.
    assert (await api("POST", "vms", user="bob", body={"name": "web"})).status == 201


async def test_twenty_parallel_creates_respect_a_quota_of_five(api, twarga):
    replies = await asyncio.gather(
        *(api("POST", "vms", body={"name": f"vm-{i}"}) for i in range(20))
    )
    statuses = sorted(r.status for r in replies)
    assert statuses.count(201) == 5, statuses
    refused = [r for r in replies if r.status != 201]
    assert {(r.status, r.json["reason"]) for r in refused} == {(409, "quota_exceeded")}
    await twarga.services.vms.wait_idle()
    assert len((await api("GET", "vms")).json) == 5
    me = (await api("GET", "me")).json
    assert me["usage"]["vms"] == 5
    with twarga.services.db.session() as session:
        refusals = session.scalars(
            select(Event).where(Event.details["reason"].as_string() == "quota_exceeded")
        ).all()
    assert len(refusals) == 15


async def test_ram_quota_counts_the_sum(api):
    for i in range(2):
        assert (await api("POST", "vms", body={"name": f"big-{i}", "ram": 4096})).status == 201
    reply = await api("POST", "vms", body={"name": "one-more", "ram": 512})
    assert (reply.status, reply.json["reason"]) == (409, "quota_exceeded")
    assert "8192" in reply.json["message"]


async def test_lifecycle_actions_are_idempotent(api, twarga):
    vm = await create_running(api)
    path = f"vms/{vm['id']}/action"
    for _ in range(2):
        reply = await api("POST", path, body={"action": "start"})
        assert (reply.status, reply.json["status"]) == (200, "running")
    for _ in range(2):
        reply = await api("POST", path, body={"action": "stop"})
        assert reply.status == 200
        assert reply.json["status"] in ("stopping", "stopped")
    await wait_status(api, vm["id"], "stopped")
    assert twarga.services.backend.state(vm["domain"]).value == "shutoff"
    assert (await api("POST", path, body={"action": "force-stop"})).json["status"] == "stopped"
    reply = await api("POST", path, body={"action": "restart"})
    assert reply.json["status"] == "running"
    reply = await api("POST", path, body={"action": "force-stop"})
    assert (reply.status, reply.json["status"]) == (200, "stopped")
    assert (await api("POST", path, body={"action": "start"})).json["status"] == "running"


async def test_restart_of_a_running_vm_comes_back_running(api, twarga):
    vm = await create_running(api)
    reply = await api("POST", f"vms/{vm['id']}/action", body={"action": "restart"})
    assert reply.status == 200
    await twarga.services.vms.wait_idle()
    assert (await wait_status(api, vm["id"], "running"))["uptime"] >= 0


async def test_bad_actions(api):
    vm = await create_running(api)
    path = f"vms/{vm['id']}/action"
    reply = await api("POST", path, body={"action": "explode"})
    assert (reply.status, reply.json["reason"], reply.json["field"]) == (
        422,
        "unknown_action",
        "action",
    )
    assert (await api("POST", path, body={})).status == 400
    assert (await api("POST", path, raw="{")).status == 400
    assert (await api("GET", f"vms/{vm['id']}")).json["status"] == "running"


async def test_destroy_removes_domain_disk_and_row(api, twarga):
    vm = await create_running(api)
    folder = twarga.services.vms.instance_dir(vm["domain"])
    assert (folder / "disk.qcow2").exists()
    reply = await api("DELETE", f"vms/{vm['id']}")
    assert reply.status == 204
    assert twarga.services.backend.state(vm["domain"]).value == "missing"
    assert not folder.exists()
    assert (await api("GET", f"vms/{vm['id']}")).status == 404
    assert (await api("DELETE", f"vms/{vm['id']}")).status == 404
    assert (await api("GET", "vms")).json == []
    # The name and the quota slot are free again.
    assert (await api("POST", "vms", body={"name": vm["name"]})).status == 201


async def test_destroy_action_and_destroy_while_pending(api, twarga):
    reply = await api("POST", "vms", body={"name": "quick"})
    gone = await api("POST", f"vms/{reply.json['id']}/action", body={"action": "destroy"})
    assert (gone.status, gone.json["status"]) == (200, "destroyed")
    await twarga.services.vms.wait_idle()
    assert twarga.services.backend.states(twarga.domain_prefix) == {}


async def test_every_action_writes_an_event(api, twarga):
    vm = await create_running(api)
    for action in ("stop", "start", "force-stop", "start"):
        await api("POST", f"vms/{vm['id']}/action", body={"action": action})
        await twarga.services.vms.wait_idle()
    await api("DELETE", f"vms/{vm['id']}")
    with twarga.services.db.session() as session:
        actions = [
            e.details.get("action")
            for e in session.scalars(select(Event).where(Event.vm_id == vm["id"]))
            if e.details.get("actor") == "alice"
        ]
    for action in ("create", "stop", "start", "force-stop", "destroy"):
        assert action in actions, actions


async def test_patch_renames_and_resizes_only_when_stopped(api, twarga):
    vm = await create_running(api)
    path = f"vms/{vm['id']}"
    reply = await api("PATCH", path, body={"ram": 1024})
    assert (reply.status, reply.json["reason"]) == (409, "vm_not_stopped")
    reply = await api("PATCH", path, body={"name": "renamed"})
    assert (reply.status, reply.json["name"]) == (200, "renamed")
    reply = await api("PATCH", path, body={"name": "renamed\n"})
    assert (reply.status, reply.json["reason"]) == (422, "invalid_name")
    await api("POST", f"{path}/action", body={"action": "force-stop"})
    reply = await api("PATCH", path, body={"ram": 1024, "cpu": 2})
    assert (reply.status, reply.json["ram"], reply.json["cpu"]) == (200, 1024, 2)
    assert (await api("PATCH", path, body={"cpu": 9})).status == 422
    assert (await api("PATCH", path, body={"owner": "bob"})).status == 400
    await api("POST", f"{path}/action", body={"action": "start"})
    xml = twarga.services.backend.domain_xml(vm["domain"])
    assert "<vcpu placement='static'>2</vcpu>" in xml


async def test_someone_elses_vm_is_not_found_on_every_route(api):
    vm = await create_running(api)
    path = f"vms/{vm['id']}"
    for method, sub, body in [
        ("GET", "", None),
        ("PATCH", "", {"name": "mine"}),
        ("DELETE", "", None),
        ("POST", "/action", {"action": "stop"}),
    ]:
        reply = await api(method, path + sub, user="bob", body=body)
        assert reply.status == 404, (method, sub, reply.json)
        assert reply.json["reason"] == "no_vm"
    assert (await api("GET", "vms", user="bob")).json == []
    assert (await api("GET", "vms", user="bob", params={"all": "1"})).json == []
    assert (await api("GET", path)).json["status"] == "running"


async def test_admin_sees_and_acts_on_every_vm(api):
    vm = await create_running(api)
    everyone = (await api("GET", "vms", user="admin", params={"all": "1"})).json
    assert [(v["id"], v["owner"]) for v in everyone] == [(vm["id"], "alice")]
    assert (await api("GET", "vms", user="admin")).json == []
    reply = await api("POST", f"vms/{vm['id']}/action", user="admin", body={"action": "force-stop"})
    assert (reply.status, reply.json["status"]) == (200, "stopped")


async def test_me_and_images(api):
    me = (await api("GET", "me")).json
    assert (me["name"], me["admin"], me["credits"]) == ("alice", False, 1000)
    assert me["quota"]["max_vms"] == 5 and me["quota"]["max_ram_mb"] == 8192
    assert (await api("GET", "me", user="admin")).json["admin"] is True
    images = (await api("GET", "images")).json
    assert [i["name"] for i in images] == ["twarga/tiny"]
    assert "base_disk" not in images[0]
    assert images[0]["default"] is True  # what a VM gets when no image is named
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ5 alice@laptop"
    reply = await api("PATCH", "me", body={"ssh_public_key": key})
    assert (reply.status, reply.json["ssh_public_key"]) == (200, key)
    reply = await api("PATCH", "me", body={"ssh_public_key": "hello\nworld"})
    assert (reply.status, reply.json["field"]) == (422, "ssh_public_key")


async def test_stopped_behind_our_back_is_reconciled(api, twarga):
    vm = await create_running(api)
    outside = libvirt.open("test:///default")  # another client, like virsh
    outside.lookupByName(vm["domain"]).destroy()
    stopped = await wait_status(api, vm["id"], "stopped", timeout=5)
    assert stopped["uptime"] == 0

    async def warning_event():
        with twarga.services.db.session() as session:
            return session.scalar(
                select(Event).where(Event.vm_id == vm["id"], Event.severity == "warning")
            )

    event = await wait_for(warning_event, timeout=5)
    assert "outside Twarga" in event.message


async def test_reconcile_at_start_fixes_drift(api, twarga):
    vm = await create_running(api)
    services = twarga.services
    # Simulate a service that was down (deaf to libvirt events) while the domain vanished.
    services.vms._loop = None
    services.backend.destroy(vm["domain"])
    services.backend.undefine(vm["domain"])
    changed = await services.vms.reconcile("test")
    assert changed == 1
    got = (await api("GET", f"vms/{vm['id']}")).json
    assert got["status"] == "error"
    assert "disappeared" in got["status_message"]
    with services.db.session() as session:
        row = session.get(VM, vm["id"])
        assert row is not None and row.status.value == "error"


async def test_an_image_pointing_at_a_host_file_cannot_be_used(api, twarga, fake_image_dir):
    import json

    from tests.conftest import make_placeholder_image

    evil = make_placeholder_image(fake_image_dir, "evil/passwd")
    meta = json.loads((evil / "image.json").read_text())
    (evil / "image.json").write_text(json.dumps({**meta, "base_disk": "../../etc/passwd"}))
    images = (await api("GET", "images")).json
    assert "evil/passwd" not in [i["name"] for i in images]
    reply = await api("POST", "vms", body={"name": "thief", "image": "evil/passwd"})
    assert (reply.status, reply.json["reason"]) == (422, "unknown_image")
    assert (await api("GET", "vms")).json == []
