"""The ledger arithmetic the VM service uses, which lives in twarga_lab.services.credits:
whether a user has credits left, and the seconds a VM ran since the last metering pass
billed when it stops running (stop, force-stop, destroy, or found stopped)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from tests.unit.services.vms_support import ALICE, status, world
from twarga_lab.db.models import VM, CreditEntry, VMStatus, utcnow
from twarga_lab.errors import QuotaExceeded
from twarga_lab.services.credits import CreditService, has_credits
from twarga_lab.services.users import MILLI


@pytest.fixture
def w(tmp_path):
    with world(tmp_path) as w:
        w.vms.billing = CreditService(w.db, w.users)  # 10 per vCPU-hour, 5 per GB-hour
        yield w


def balance(w, name="alice") -> float:
    user_id = w.users.ensure(name)
    with w.db.session() as session:
        entry = session.scalar(
            select(CreditEntry)
            .where(CreditEntry.user_id == user_id)
            .order_by(CreditEntry.id.desc())
            .limit(1)
        )
        return entry.balance_after_milli / MILLI


def usage_rows(w) -> list[str]:
    with w.db.session() as session:
        return list(
            session.scalars(
                select(CreditEntry.reason)
                .where(CreditEntry.actor == "meter")
                .order_by(CreditEntry.id)
            )
        )


async def ran_for(w, seconds: float) -> dict:
    """A running VM (1 vCPU, 512 MB: 12.5 credits an hour) started ``seconds`` ago."""
    vm = await w.running_vm()
    with w.db.session() as session:
        row = session.get(VM, vm["id"])
        row.created_at = row.started_at = utcnow() - timedelta(seconds=seconds)
    return vm


def test_has_credits_is_a_balance_above_zero(w):
    user_id = w.users.ensure("alice")
    with w.db.session() as session:
        assert has_credits(session, user_id)  # the starting credits
    w.set_balance("alice", 1)  # a thousandth of a credit
    with w.db.session() as session:
        assert has_credits(session, user_id)
    w.set_balance("alice", 0)
    with w.db.session() as session:
        assert not has_credits(session, user_id)


@pytest.mark.parametrize("action", ["force-stop", "stop", "destroy"])
async def test_a_vm_that_stops_running_pays_its_seconds(w, action):
    vm = await ran_for(w, 3600)
    await w.vms.action(ALICE, vm["id"], action)
    await w.vms.wait_idle()
    assert balance(w) == pytest.approx(100 - 12.5, abs=0.05)
    (reason,) = usage_rows(w)
    assert reason.startswith("VM usage: web 360")
    assert w.row(vm["id"]).metered_until is not None
    # It is not running any more: no second charge for the same time.
    w.vms.billing.meter()
    assert len(usage_rows(w)) == 1


async def test_a_vm_found_stopped_behind_our_back_pays_too(w):
    vm = await ran_for(w, 1800)
    w.backend.destroy(vm["domain"])
    await w.vms.reconcile("test")
    assert status(w, vm["id"]) is VMStatus.stopped
    assert balance(w) == pytest.approx(100 - 6.25, abs=0.05)


async def test_the_charge_stops_at_zero_and_then_nothing_starts(w):
    vm = await ran_for(w, 100 * 3600)  # 1250 credits' worth, with 100 left
    await w.vms.action(ALICE, vm["id"], "force-stop")
    assert balance(w) == 0
    with pytest.raises(QuotaExceeded) as e:
        await w.vms.action(ALICE, vm["id"], "start")
    assert e.value.reason == "no_credits"
    assert status(w, vm["id"]) is VMStatus.stopped


async def test_without_billing_stopping_charges_nothing(w):
    w.vms.billing = None
    vm = await ran_for(w, 3600)
    await w.vms.action(ALICE, vm["id"], "force-stop")
    assert usage_rows(w) == []
    assert balance(w) == 100
