"""twarga_lab.services.vms.lifecycle on libvirt's test driver: the first boot, start,
stop, force-stop, restart and destroy, the statuses and events they leave, and the
status book's rules (billing when a VM leaves running, no event without a change)."""

from __future__ import annotations

import pytest

from tests.unit.services.vms_support import ADMIN, ALICE, BOB, status, world
from twarga_lab.db.models import VMStatus
from twarga_lab.errors import Conflict, NotFound, QuotaExceeded, ValidationFailed
from twarga_lab.services.vms import StatusBook
from twarga_lab.services.vms.quota import CreateRequest
from twarga_lab.virt.backend import DomainState


@pytest.fixture
def w(tmp_path):
    with world(tmp_path) as w:
        yield w


def pending_vm(w, name: str = "web") -> int:
    """A VM row as ``create`` makes it, before its provisioning runs."""
    request = CreateRequest(name, "twarga/tiny", 512, 1, 10)
    user_id = w.users.ensure("alice")
    return w.vms._insert_vm(ALICE, user_id, request, w.images.get("twarga/tiny"))


def messages(w, vm_id):
    return [e.message for e in w.events(vm_id)]


async def test_a_created_vm_boots_by_itself(w):
    vm = await w.create(ALICE, name="web")
    assert vm["status"] == "pending"
    await w.vms.wait_idle()
    row = w.row(vm["id"])
    assert row.status is VMStatus.running and row.started_at is not None
    assert w.backend.state(vm["domain"]) is DomainState.running
    assert messages(w, vm["id"]) == ["VM web created by alice", "VM web is running"]


async def test_stop_then_start(w):
    vm = await w.running_vm()
    got = await w.vms.action(ALICE, vm["id"], "stop")
    assert got["status"] in ("stopping", "stopped")
    await w.vms.wait_idle()
    assert status(w, vm["id"]) is VMStatus.stopped
    assert w.backend.state(vm["domain"]) is DomainState.shutoff
    before = len(w.events(vm["id"]))
    assert (await w.vms.action(ALICE, vm["id"], "stop"))["status"] == "stopped"
    assert len(w.events(vm["id"])) == before  # stopping a stopped VM does nothing
    got = await w.vms.action(ALICE, vm["id"], "start")
    assert got["status"] == "running"
    assert w.backend.state(vm["domain"]) is DomainState.running
    assert "VM start requested by alice" in messages(w, vm["id"])


async def test_force_stop_is_immediate_and_says_who(w):
    vm = await w.running_vm()
    got = await w.vms.action(ADMIN, vm["id"], "force-stop")
    assert got["status"] == "stopped"
    assert w.backend.state(vm["domain"]) is DomainState.shutoff
    assert "VM forced off by root" in messages(w, vm["id"])


async def test_restart_brings_a_running_vm_back(w):
    vm = await w.running_vm()
    await w.vms.action(ALICE, vm["id"], "restart")
    await w.vms.wait_idle()
    assert status(w, vm["id"]) is VMStatus.running
    assert "VM restart requested by alice" in messages(w, vm["id"])
    await w.vms.action(ALICE, vm["id"], "force-stop")
    assert (await w.vms.action(ALICE, vm["id"], "restart"))["status"] == "running"


async def test_no_credits_refuses_a_start_and_the_vm_stays_stopped(w):
    vm = await w.running_vm()
    await w.vms.action(ALICE, vm["id"], "force-stop")
    w.set_balance("alice", 0)
    for action in ("start", "restart"):
        with pytest.raises(QuotaExceeded) as e:
            await w.vms.action(ALICE, vm["id"], action)
        assert e.value.reason == "no_credits"
    assert status(w, vm["id"]) is VMStatus.stopped


async def test_refused_actions(w):
    with pytest.raises(ValidationFailed) as e:
        await w.vms.action(ALICE, 1, "reboot")
    assert e.value.reason == "unknown_action"
    vm_id = pending_vm(w)  # being created (its provisioning has not run)
    for action in ("stop", "force-stop"):
        with pytest.raises(Conflict) as e:
            await w.vms.action(ALICE, vm_id, action)
        assert e.value.reason == "vm_pending"
    assert (await w.vms.action(ALICE, vm_id, "start"))["status"] == "pending"  # starts anyway
    with pytest.raises(NotFound) as e:
        await w.vms.action(BOB, vm_id, "start")  # someone else's VM is no VM
    assert e.value.reason == "no_vm"
    assert status(w, vm_id) is VMStatus.pending


async def test_destroy_removes_domain_and_files_and_keeps_the_row(w):
    vm = await w.running_vm()
    folder = w.vms.instance_dir(vm["domain"])
    assert (folder / "disk.qcow2").exists()
    got = await w.vms.action(ALICE, vm["id"], "destroy")
    assert got["status"] == "destroyed"
    assert vm["domain"] not in w.domains()
    assert not folder.exists()
    assert w.row(vm["id"]).destroyed_at is not None
    assert messages(w, vm["id"])[-1] == "VM web destroyed by alice"
    with pytest.raises(NotFound):
        await w.vms.get(ALICE, vm["id"])
    # The name and the port are free again.
    again = await w.create(ALICE, name="web")
    assert again["ssh_port"] == vm["ssh_port"]


async def test_a_failed_first_boot_is_an_error_with_its_reason_and_start_retries(w):
    vm_id = pending_vm(w)
    base = w.image_dir / "base.qcow2"
    saved = base.read_bytes()
    base.unlink()
    await w.vms.lifecycle.provision(vm_id)
    row = w.row(vm_id)
    assert row.status is VMStatus.error
    assert row.status_message
    assert w.events(vm_id)[-1].severity == "warning"
    base.write_bytes(saved)
    got = await w.vms.action(ALICE, vm_id, "start")
    assert got["status"] == "running"


def test_the_book_bills_a_vm_leaving_running_and_records_only_changes(w):
    settled: list[str] = []
    book = StatusBook(w.db, lambda session, vm: settled.append(vm.name))
    vm_id = pending_vm(w)
    count = len(w.events(vm_id))
    book.set_status(vm_id, VMStatus.running, None, "boot")
    assert w.row(vm_id).started_at is not None and settled == []
    book.set_status(vm_id, VMStatus.running, None, "boot")  # no change, no event
    assert len(w.events(vm_id)) == count + 1
    book.set_status(vm_id, VMStatus.error, "it broke", "boot")
    assert settled == ["web"]
    event = w.events(vm_id)[-1]
    assert (event.message, event.severity) == ("VM web is error: it broke", "warning")
    assert (event.details["previous"], event.details["status"]) == ("running", "error")
    book.set_status(vm_id, VMStatus.stopped, None, "stop")
    assert settled == ["web"]  # only leaving running is billed
    assert book.lock(vm_id) is book.lock(vm_id)
    book.forget(vm_id)
    assert book.status(vm_id) is VMStatus.stopped
    assert book.status(999) is None
