"""twarga_lab.services.vms.views: the JSON a VM is shown as, its uptime, the lists users
and admins see, and the owner's ``/credentials``."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta

import pytest

from tests.unit.services.vms_support import ADMIN, ALICE, BOB, world
from twarga_lab.db.models import VM, VMStatus
from twarga_lab.errors import NotFound
from twarga_lab.services.vms import uptime_seconds, vm_to_json
from twarga_lab.services.vms.views import list_vms, view

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def w(tmp_path):
    with world(tmp_path) as w:
        yield w


def a_vm(**fields) -> VM:
    values = {
        "id": 3, "name": "web", "image": "twarga/tiny", "os_type": "linux", "ram_mb": 1024,
        "cpu": 2, "disk_gb": 20, "status": VMStatus.running, "created_at": T0,
        "started_at": T0 + timedelta(minutes=1), "ssh_port": 22005, "ip_address": "10.0.2.15",
        "domain_name": "twarga-3-web",
    }  # fmt: skip
    values.update(fields)
    return VM(**values)


def test_uptime_counts_from_the_last_start_and_only_while_running():
    vm = a_vm()
    assert uptime_seconds(vm, T0 + timedelta(minutes=2, seconds=30)) == 90
    assert uptime_seconds(vm, T0) == 0  # a clock behind the start is never negative
    assert uptime_seconds(a_vm(status=VMStatus.stopped), T0 + timedelta(hours=1)) == 0
    assert uptime_seconds(a_vm(started_at=None), T0 + timedelta(hours=1)) == 0


def test_the_json_of_a_vm():
    got = vm_to_json(a_vm(), "alice", T0 + timedelta(minutes=11))
    assert got == {
        "id": 3,
        "name": "web",
        "owner": "alice",
        "status": "running",
        "status_message": None,
        "image": "twarga/tiny",
        "os_type": "twarga/tiny",
        "os_family": "linux",
        "ram": 1024,
        "cpu": 2,
        "disk": 20,
        "ip_address": "10.0.2.15",
        "ssh_host": "127.0.0.1",
        "ssh_port": 22005,
        "domain": "twarga-3-web",
        "created_at": T0.isoformat(),
        "started_at": (T0 + timedelta(minutes=1)).isoformat(),
        "uptime": 600,
        "ready": True,  # no readiness known: a running VM counts as ready
        # Not a lab's VM; no idle stop configured.
        "lab_id": None,
        "lab_name": None,
        "lab_machine": None,
        "host": "local",
        "addresses": {},
        "idle_stop_at": None,
    }
    booting = vm_to_json(a_vm(), "alice", T0 + timedelta(minutes=11), ready=False)
    assert booting["ready"] is False and booting["status"] == "running"
    off = vm_to_json(a_vm(ssh_port=None, started_at=None, status=VMStatus.error), "alice", T0)
    assert (off["ssh_host"], off["ssh_port"], off["started_at"], off["uptime"]) == (
        None, None, None, 0,
    )  # fmt: skip


async def test_lists_are_per_owner_live_and_in_order_and_admins_may_see_all(w):
    web = await w.create(ALICE, name="web")
    await w.create(BOB, name="db")
    api = await w.create(ALICE, name="api")
    await w.vms.wait_idle()
    await w.vms.destroy(ALICE, web["id"])
    assert [v["name"] for v in await w.vms.list(ALICE)] == ["api"]
    assert [v["name"] for v in await w.vms.list(ALICE, all_users=True)] == ["api"]  # not admin
    assert [(v["owner"], v["name"]) for v in await w.vms.list(ADMIN, all_users=True)] == [
        ("bob", "db"),
        ("alice", "api"),
    ]
    assert [v["name"] for v in list_vms(w.db, None)] == ["db", "api"]
    assert view(w.db, web["id"])["status"] == "destroyed"  # history stays viewable
    with pytest.raises(NotFound) as e:
        view(w.db, 9999)
    assert e.value.reason == "no_vm"
    assert (await w.vms.get(ADMIN, api["id"]))["owner"] == "alice"
    with pytest.raises(NotFound):
        await w.vms.get(BOB, api["id"])


async def test_credentials_are_the_owners_only_and_reading_them_is_an_event(w):
    vm = await w.running_vm()
    got = w.vms.credentials(ALICE, vm["id"])
    row = w.row(vm["id"])
    assert got["username"] == "root"
    assert got["password"] == row.root_password
    assert (got["ssh_host"], got["ssh_port"], got["ssh_port_moved"]) == (
        "127.0.0.1", vm["ssh_port"], None,
    )  # fmt: skip
    assert got["ssh_host_key"] == w.vms.host_key(vm["domain"])
    assert got["ssh_host_key_fingerprint"].startswith("SHA256:")
    for other in (BOB, ADMIN):
        with pytest.raises(NotFound):
            w.vms.credentials(other, vm["id"])
    (event,) = w.events(vm["id"], action="credentials_read")
    assert (event.type, event.message) == ("security", "root credentials of VM web read by alice")


async def test_credentials_say_why_the_ssh_port_moved(w):
    vm = await w.running_vm()
    await w.vms.action(ALICE, vm["id"], "force-stop")
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", vm["ssh_port"]))
        squatter.listen()
        started = await w.vms.action(ALICE, vm["id"], "start")
    assert started["ssh_port"] != vm["ssh_port"]
    assert started["status_message"].startswith(f"SSH moved from port {vm['ssh_port']}")
    moved = w.vms.credentials(ALICE, vm["id"])["ssh_port_moved"]
    assert moved["from"] == vm["ssh_port"] and moved["to"] == started["ssh_port"]
    assert moved["reason"] == "another program was listening on the old port"
