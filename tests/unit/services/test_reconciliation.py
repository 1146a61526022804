"""twarga_lab.services.vms.reconciliation on libvirt's test driver: what the service
finds when it starts (or libvirt comes back), what libvirt's lifecycle events change,
and the orphans a crash between libvirt and the database leaves."""

from __future__ import annotations

import pytest

from tests.unit.services.vms_support import ALICE, status, wait_for, world
from twarga_lab.db.models import VM, VMStatus
from twarga_lab.virt.backend import DomainState, LifecycleEvent
from twarga_lab.virt.domain import DomainSpec


@pytest.fixture
def w(tmp_path):
    with world(tmp_path) as w:
        yield w


def outside(w, vm_id):
    return [e for e in w.events(vm_id, action="reconcile") if e.details["outside_twarga"]]


async def test_a_domain_that_vanished_behind_our_back_is_marked_as_such(w):
    vm = await w.running_vm()
    w.backend.destroy(vm["domain"])
    w.backend.undefine(vm["domain"])
    assert await w.vms.reconcile("test") == 1
    row = w.row(vm["id"])
    assert row.status is VMStatus.error
    assert row.status_message == "its libvirt domain has disappeared"
    (event,) = outside(w, vm["id"])
    assert event.severity == "warning"
    assert event.message == "VM web went from running to error outside Twarga (found at test)"
    assert await w.vms.reconcile("test") == 0  # nothing more to change


async def test_a_domain_powered_off_outside_twarga_is_stopped_with_a_warning(w):
    vm = await w.running_vm()
    w.backend.destroy(vm["domain"])  # virsh destroy, say
    assert await w.vms.reconcile("libvirt reconnect") == 1
    assert status(w, vm["id"]) is VMStatus.stopped
    (event,) = outside(w, vm["id"])
    assert (event.details["previous"], event.details["status"]) == ("running", "stopped")


async def test_interrupted_creates_and_destroys_are_finished(w):
    booting = await w.running_vm("booting")
    doomed = await w.running_vm("doomed")
    with w.db.session() as session:
        session.get(VM, booting["id"]).status = VMStatus.pending  # crashed while creating
        session.get(VM, doomed["id"]).status = VMStatus.destroying  # ... while destroying
    w.backend.destroy(booting["domain"])
    w.backend.undefine(booting["domain"])
    await w.vms.reconcile("service start")
    await w.vms.wait_idle()
    assert status(w, doomed["id"]) is VMStatus.destroyed
    assert doomed["domain"] not in w.domains()
    assert not w.vms.instance_dir(doomed["domain"]).exists()
    assert w.events(doomed["id"])[-1].message == (
        f"destroy of VM {doomed['domain']} finished (found destroying at service start)"
    )
    assert status(w, booting["id"]) is VMStatus.running  # provisioned again, from scratch
    assert w.backend.state(booting["domain"]) is DomainState.running


async def test_lifecycle_events_apply_the_domains_state(w):
    await w.vms.start_up()
    vm = await w.running_vm()
    w.backend.destroy(vm["domain"])  # libvirt tells the listener on its event thread

    def stopped():
        return status(w, vm["id"]) is VMStatus.stopped

    await wait_for(stopped)
    (event,) = outside(w, vm["id"])
    assert event.details["detail"].startswith("libvirt: ")


async def test_an_event_while_twarga_stops_a_running_guest_changes_nothing(w):
    vm = await w.running_vm()
    with w.db.session() as session:
        session.get(VM, vm["id"]).status = VMStatus.stopping
    event = LifecycleEvent(vm["domain"], DomainState.running, "resumed")
    await w.vms.reconciler.on_lifecycle(event)
    assert status(w, vm["id"]) is VMStatus.stopping  # still shutting down: not "running"
    w.backend.destroy(vm["domain"])
    await w.vms.reconciler.on_lifecycle(LifecycleEvent(vm["domain"], DomainState.shutoff, "x"))
    assert status(w, vm["id"]) is VMStatus.stopped
    assert outside(w, vm["id"]) == []  # stopping -> stopped was Twarga's own doing


async def test_events_of_other_domains_and_of_a_deaf_service_are_ignored(w):
    vm = await w.running_vm()
    w.vms._loop = None  # a service that is down hears nothing
    w.vms.reconciler.on_lifecycle_thread(LifecycleEvent(vm["domain"], DomainState.shutoff, "x"))
    await w.vms.reconciler.on_lifecycle(LifecycleEvent("someone-else", DomainState.shutoff, "x"))
    await w.vms.wait_idle()
    assert status(w, vm["id"]) is VMStatus.running


async def test_orphan_domains_and_folders_are_removed_and_others_left_alone(w):
    vm = await w.running_vm()
    ghost = f"{w.prefix}999-ghost"  # our name shape, no row
    w.backend.define(DomainSpec(name=ghost, memory_mib=64, vcpus=1))
    tagged = f"{w.prefix}renamed"  # not our shape, but our metadata
    w.backend.define(DomainSpec(name=tagged, memory_mib=64, vcpus=1, owner="alice", vm_id=7))
    foreign = f"{w.prefix}notours"  # our prefix, neither shape nor metadata
    w.backend.define(DomainSpec(name=foreign, memory_mib=64, vcpus=1))
    instances = w.vms.provisioner.config.instances_dir
    (instances / ghost).mkdir()
    (instances / f"{w.prefix}5-left").mkdir()
    (instances / "unrelated").mkdir()
    removed = await w.vms.remove_orphans()
    assert sorted(removed) == sorted([ghost, tagged, f"{w.prefix}5-left"])
    assert w.domains() == {vm["domain"], foreign}
    assert sorted(p.name for p in instances.iterdir()) == sorted([vm["domain"], "unrelated"])
    events = w.events(action="orphan_removed")
    assert [e.details["domain"] for e in events] == removed
    assert events[0].message == f"orphan domain {ghost} (no VM in the database) removed"
    assert status(w, vm["id"]) is VMStatus.running
    assert (await w.vms.get(ALICE, vm["id"]))["status"] == "running"
