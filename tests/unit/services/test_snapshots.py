"""SnapshotService on libvirt's test driver, called directly: take, list, revert and
delete, the per-VM quota, ownership, busy VMs and the SOC events of each change. The VM
service is the application's own (``make_services`` on test:///default)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from tests.helpers import wait_for
from twarga_lab.db.models import Event, VMStatus
from twarga_lab.errors import Conflict, NotFound, QuotaExceeded, ValidationFailed
from twarga_lab.schemas import CreateVM
from twarga_lab.services import Identity
from twarga_lab.services.snapshots import SnapshotService, snapshot_to_json

ALICE, BOB, ADMIN = Identity("alice"), Identity("bob"), Identity("root", admin=True)


async def running_vm(twarga: Any, name: str = "snappy") -> dict[str, Any]:
    vms = twarga.services.vms
    vm = await vms.create(ALICE, CreateVM(name))

    async def running() -> dict[str, Any] | None:
        now = await vms.get(ALICE, vm["id"])
        assert now["status"] != "error", now
        return now if now["status"] == "running" else None

    return await wait_for(running)


def snapshots_of(twarga: Any, max_per_vm: int = 2) -> SnapshotService:
    s = twarga.services
    return SnapshotService(s.db, s.backend, s.vms, max_per_vm=max_per_vm)


def snapshot_events(twarga: Any, vm_id: int) -> list[tuple[str, str, str]]:
    with twarga.services.db.session() as session:
        return [
            (e.details["action"], e.details["snapshot"], e.severity)
            for e in session.scalars(select(Event).where(Event.vm_id == vm_id).order_by(Event.id))
            if "snapshot" in e.details  # not the status changes the revert makes
        ]


async def test_take_list_revert_and_delete(twarga):
    vm = await running_vm(twarga)
    snapshots = snapshots_of(twarga)
    assert await snapshots.list(ALICE, vm["id"]) == []
    taken = await snapshots.create(ALICE, vm["id"], "s1")
    assert (taken["name"], taken["state"]) == ("s1", "running")
    listed = await snapshots.list(ADMIN, vm["id"])
    assert listed == [taken]
    assert listed == [snapshot_to_json(s) for s in twarga.services.backend.snapshots(vm["domain"])]

    await twarga.services.vms.action(ALICE, vm["id"], "force-stop")
    await wait_for(lambda: _status_is(twarga, vm["id"], "stopped"))
    reverted = await snapshots.action(ALICE, vm["id"], "s1", "revert")
    assert reverted["status"] == "running"
    assert twarga.services.backend.state(vm["domain"]).value == "running"

    await snapshots.delete(ALICE, vm["id"], "s1")
    assert await snapshots.list(ALICE, vm["id"]) == []
    assert snapshot_events(twarga, vm["id"]) == [
        ("snapshot_create", "s1", "info"),
        ("snapshot_revert", "s1", "info"),
        ("snapshot_delete", "s1", "info"),
    ]


async def _status_is(twarga: Any, vm_id: int, status: str) -> bool:
    return (await twarga.services.vms.get(ALICE, vm_id))["status"] == status


async def test_duplicates_and_the_quota_are_refused(twarga):
    vm = await running_vm(twarga)
    snapshots = snapshots_of(twarga, max_per_vm=2)
    await snapshots.create(ALICE, vm["id"], "s1")
    with pytest.raises(Conflict) as duplicate:
        await snapshots.create(ALICE, vm["id"], "s1")
    assert duplicate.value.reason == "duplicate_name"
    await snapshots.create(ALICE, vm["id"], "s2")
    with pytest.raises(QuotaExceeded) as over:
        await snapshots.create(ALICE, vm["id"], "s3")
    assert over.value.reason == "quota_exceeded"
    assert [s["name"] for s in await snapshots.list(ALICE, vm["id"])] == ["s1", "s2"]
    assert snapshot_events(twarga, vm["id"])[-1] == ("snapshot_create", "s3", "warning")


async def test_someone_elses_vm_and_unknown_snapshots_are_not_found(twarga):
    vm = await running_vm(twarga)
    snapshots = snapshots_of(twarga)
    await snapshots.create(ALICE, vm["id"], "s1")
    for call in (
        snapshots.list(BOB, vm["id"]),
        snapshots.create(BOB, vm["id"], "mine"),
        snapshots.delete(BOB, vm["id"], "s1"),
        snapshots.action(BOB, vm["id"], "s1", "revert"),
    ):
        with pytest.raises(NotFound):
            await call
    with pytest.raises(NotFound) as missing:
        await snapshots.delete(ALICE, vm["id"], "nope")
    assert missing.value.reason == "no_snapshot"
    with pytest.raises(NotFound):
        await snapshots.action(ALICE, vm["id"], "nope", "revert")
    assert [s["name"] for s in await snapshots.list(ALICE, vm["id"])] == ["s1"]


async def test_bad_names_and_actions_are_refused_before_libvirt(twarga):
    vm = await running_vm(twarga)
    snapshots = snapshots_of(twarga)
    with pytest.raises(ValidationFailed) as bad_name:
        await snapshots.create(ALICE, vm["id"], "no spaces\n")
    assert bad_name.value.reason == "invalid_name"
    with pytest.raises(ValidationFailed) as bad_action:
        await snapshots.action(ALICE, vm["id"], "s1", "explode")
    assert bad_action.value.reason == "unknown_action"
    assert twarga.services.backend.snapshots(vm["domain"]) == []


async def test_a_busy_vm_is_not_snapshotted(twarga):
    vm = await running_vm(twarga)
    snapshots = snapshots_of(twarga)
    twarga.services.vms.set_status(vm["id"], VMStatus.stopping, None, "stop", "alice")
    with pytest.raises(Conflict) as busy:
        await snapshots.create(ALICE, vm["id"], "s1")
    assert busy.value.reason == "vm_busy"
    assert await snapshots.list(ALICE, vm["id"]) == []  # reading is fine
