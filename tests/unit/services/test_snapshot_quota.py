"""Snapshots against the disk quota and the credit meter, on libvirt's test driver with the
application's own services: each snapshot counts as its VM's disk size, one over
``max_disk_gb`` is 409 ``quota_exceeded``, at zero credits none is taken, and a metering
pass charges GB x hours x ``per_gb_snapshot_hour`` in the ledger."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from tests.helpers import wait_for
from twarga_lab.db.models import Event
from twarga_lab.errors import QuotaExceeded
from twarga_lab.schemas import CreateVM, GrantCredits, SetQuota
from twarga_lab.services import Identity
from twarga_lab.services.credits import utcnow
from twarga_lab.services.users import MILLI
from twarga_lab.services.vms.quota import CreateRequest, check_create_quota

ALICE, ADMIN = Identity("alice"), Identity("root", admin=True)


async def running_vm(twarga: Any, name: str = "snappy") -> dict[str, Any]:
    vms = twarga.services.vms
    vm = await vms.create(ALICE, CreateVM(name))

    async def running() -> dict[str, Any] | None:
        now = await vms.get(ALICE, vm["id"])
        assert now["status"] != "error", now
        return now if now["status"] == "running" else None

    return await wait_for(running)


def usage(twarga: Any) -> dict[str, int]:
    return twarga.services.users.me(ALICE)["usage"]


def set_disk_quota(twarga: Any, gb: int | None) -> None:
    twarga.services.credits.set_quota(ADMIN, "alice", SetQuota(max_disk_gb=gb))


def balance_milli(twarga: Any) -> int:
    return round(twarga.services.users.me(ALICE)["credits"] * MILLI)


def free_meter(twarga: Any, per_gb_snapshot_hour: float) -> Any:
    """The app's credit service charging snapshots only (running VMs cost nothing)."""
    credits = twarga.services.credits
    credits.per_vcpu_hour = 0.0
    credits.per_gb_ram_hour = 0.0
    credits.per_gb_snapshot_hour = per_gb_snapshot_hour
    return credits


async def test_snapshots_count_as_their_vms_disk(twarga):
    vm = await running_vm(twarga)
    snapshots = twarga.services.snapshots
    assert usage(twarga) == {
        "vms": 1, "ram_mb": vm["ram"], "cpu": vm["cpu"], "disk_gb": vm["disk"],
        "snapshot_disk_gb": 0,
    }  # fmt: skip
    await snapshots.create(ALICE, vm["id"], "s1")
    await snapshots.create(ALICE, vm["id"], "s2")
    assert usage(twarga)["snapshot_disk_gb"] == 2 * vm["disk"]
    assert usage(twarga)["disk_gb"] == vm["disk"]  # the VMs' own disks, unchanged
    listed = {u["name"]: u for u in twarga.services.credits.list_users()}
    assert listed["alice"]["usage"]["snapshot_disk_gb"] == 2 * vm["disk"]
    await snapshots.delete(ALICE, vm["id"], "s1")
    assert usage(twarga)["snapshot_disk_gb"] == vm["disk"]


async def test_a_snapshot_over_the_disk_quota_is_refused(twarga):
    vm = await running_vm(twarga)
    snapshots = twarga.services.snapshots
    set_disk_quota(twarga, 2 * vm["disk"])  # the VM and one snapshot
    await snapshots.create(ALICE, vm["id"], "s1")
    with pytest.raises(QuotaExceeded) as refused:
        await snapshots.create(ALICE, vm["id"], "s2")
    assert refused.value.reason == "quota_exceeded"
    assert f"quota of {2 * vm['disk']} GB" in str(refused.value)
    assert [s["name"] for s in await snapshots.list(ALICE, vm["id"])] == ["s1"]
    with twarga.services.db.session() as session:
        warned = [
            e.details.get("reason")
            for e in session.scalars(select(Event).where(Event.vm_id == vm["id"]))
            if e.details.get("snapshot") == "s2"
        ]
    assert warned == ["quota_exceeded"]

    # A new VM sees the snapshot's GB in the used sum too: 10 + 10 + 10 > 30.
    set_disk_quota(twarga, 3 * vm["disk"] - 1)
    users = twarga.services.users
    request = CreateRequest(name="other", image=vm["image"], ram=512, cpu=1, disk=vm["disk"])
    with twarga.services.db.session() as session:
        alice = users.ensure("alice")
        with pytest.raises(QuotaExceeded) as refused:
            check_create_quota(session, users, alice, request)
    assert refused.value.reason == "quota_exceeded"

    # Deleting the snapshot frees its GB.
    await snapshots.delete(ALICE, vm["id"], "s1")
    with twarga.services.db.session() as session:
        check_create_quota(session, users, alice, request)
    set_disk_quota(twarga, 2 * vm["disk"])
    await snapshots.create(ALICE, vm["id"], "s2")


async def test_no_snapshot_at_zero_credits(twarga):
    vm = await running_vm(twarga)
    left = twarga.services.users.me(ALICE)["credits"]
    twarga.services.credits.grant(ADMIN, "alice", GrantCredits(amount=-left, reason="none"))
    with pytest.raises(QuotaExceeded) as refused:
        await twarga.services.snapshots.create(ALICE, vm["id"], "s1")
    assert refused.value.reason == "no_credits"
    assert await twarga.services.snapshots.list(ALICE, vm["id"]) == []


async def test_a_metering_pass_charges_gb_hours_of_snapshots(twarga):
    vm = await running_vm(twarga)
    credits = free_meter(twarga, 0.5)
    await twarga.services.snapshots.create(ALICE, vm["id"], "s1")
    await twarga.services.snapshots.create(ALICE, vm["id"], "s2")
    start = utcnow() + timedelta(seconds=2)  # after both were taken
    credits.meter(start)  # the VM's time until now, for nothing
    before = balance_milli(twarga)

    report = credits.meter(start + timedelta(minutes=30))
    # 2 snapshots x 10 GB x 0.5 h x 0.5 credits per GB-hour = 5 credits.
    expected = round(2 * vm["disk"] * 0.5 * 0.5 * MILLI)
    assert report.charged_milli == {"alice": expected}
    assert balance_milli(twarga) == before - expected
    row = credits.ledger("alice", limit=1)[0]
    assert row["amount"] == -expected / MILLI
    assert row["actor"] == "meter"
    assert row["reason"] == (
        f"snapshot storage: snappy/s1 {vm['disk']} GB 1800 s, snappy/s2 {vm['disk']} GB 1800 s"
    )
    # The same instant again charges nothing more.
    assert credits.meter(start + timedelta(minutes=30)).charged_milli == {}
    assert balance_milli(twarga) == before - expected


async def test_a_snapshot_created_during_the_pass_pays_from_its_creation(twarga):
    vm = await running_vm(twarga)
    credits = free_meter(twarga, 1.0)
    credits.snapshots_metered_until = utcnow() - timedelta(hours=1)
    await twarga.services.snapshots.create(ALICE, vm["id"], "s1")
    created = twarga.services.backend.snapshots(vm["domain"])[0].created_at
    before = balance_milli(twarga)
    credits.meter(created + timedelta(minutes=6))
    # 10 GB x 0.1 h x 1 credit: not the hour before it existed.
    assert before - balance_milli(twarga) == round(vm["disk"] * 0.1 * MILLI)


async def test_snapshots_take_the_last_credits_and_no_more(twarga):
    vm = await running_vm(twarga)
    credits = free_meter(twarga, 1.0)
    await twarga.services.snapshots.create(ALICE, vm["id"], "s1")
    start = utcnow() + timedelta(seconds=2)
    credits.meter(start)
    left = twarga.services.users.me(ALICE)["credits"]
    credits.grant(ADMIN, "alice", GrantCredits(amount=1 - left, reason="one left"))

    report = credits.meter(start + timedelta(hours=1))  # costs 10, 1 is left
    assert report.charged_milli == {"alice": MILLI}
    assert report.exhausted == ["alice"]
    assert balance_milli(twarga) == 0
    # At zero nothing more is charged, and the warning is not repeated every pass.
    report = credits.meter(start + timedelta(hours=2))
    assert (report.charged_milli, report.exhausted) == ({}, [])
    assert balance_milli(twarga) == 0
    with twarga.services.db.session() as session:
        exhausted = [
            e
            for e in session.scalars(select(Event))
            if e.details.get("action") == "credits_exhausted" and e.user_name == "alice"
        ]
    assert len(exhausted) == 1
