"""Credits: metering by size with a patched clock, and a ledger that loses nothing under
concurrent metering and grants."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from twarga_lab.db import Database
from twarga_lab.db.models import VM, CreditEntry, VMStatus
from twarga_lab.schemas import GrantCredits
from twarga_lab.services import Identity
from twarga_lab.services.credits import CreditService
from twarga_lab.services.users import UserService

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
ADMIN = Identity("root", admin=True)


@pytest.fixture
def setup(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'credits.db'}").open()
    users = UserService(db, starting_credits=1000)
    credits = CreditService(db, users, per_vcpu_hour=10, per_gb_ram_hour=5)
    yield db, users, credits
    db.dispose()


def add_running_vm(db, users, name, owner="alice", cpu=2, ram=2048, started=T0):
    owner_id = users.ensure(owner)
    with db.session() as session:
        vm = VM(owner_id=owner_id, name=name, image="twarga/tiny", os_type="linux", ram_mb=ram,
                cpu=cpu, disk_gb=10, status=VMStatus.running, started_at=started,
                created_at=started, domain_name=f"t-{name}")  # fmt: skip
        session.add(vm)
        session.flush()
        return vm.id


def balance(users, name="alice"):
    return users.me(Identity(name))["credits"]


def test_running_vms_cost_by_size_per_minute(setup):
    db, users, credits = setup
    add_running_vm(db, users, "big", cpu=2, ram=2048)  # 2*10 + 2*5 = 30 credits per hour
    add_running_vm(db, users, "small", cpu=1, ram=1024)  # 15 per hour
    credits.meter(T0 + timedelta(minutes=1))
    assert balance(users) == pytest.approx(1000 - 45 / 60, abs=0.002)
    credits.meter(T0 + timedelta(hours=1))
    assert balance(users) == pytest.approx(1000 - 45, abs=0.002)
    # Metering twice at the same instant charges nothing more.
    credits.meter(T0 + timedelta(hours=1))
    assert balance(users) == pytest.approx(955, abs=0.002)


def test_stopped_time_is_not_charged_after_a_restart(setup):
    db, users, credits = setup
    vm_id = add_running_vm(db, users, "web", cpu=1, ram=1024)
    credits.meter(T0 + timedelta(hours=1))
    with db.session() as session:
        vm = session.get(VM, vm_id)
        vm.status = VMStatus.stopped
    credits.meter(T0 + timedelta(hours=5))  # stopped: nothing
    with db.session() as session:
        vm = session.get(VM, vm_id)
        vm.status = VMStatus.running
        vm.started_at = T0 + timedelta(hours=5)
    credits.meter(T0 + timedelta(hours=6))
    assert balance(users) == pytest.approx(1000 - 30, abs=0.002)


def test_the_balance_stops_at_zero_and_reports_who_ran_out(setup):
    db, users, credits = setup
    add_running_vm(db, users, "hog", cpu=4, ram=4096)  # 60 per hour
    report = credits.meter(T0 + timedelta(hours=100))
    assert report.exhausted == ["alice"]
    assert balance(users) == 0
    with db.session() as session:
        assert session.scalar(select(func.min(CreditEntry.balance_after_milli))) == 0


def test_concurrent_grants_and_metering_lose_no_ledger_row(setup):
    db, users, credits = setup
    add_running_vm(db, users, "busy", cpu=1, ram=1024)
    errors = []

    def grants():
        try:
            for _ in range(25):
                credits.grant(ADMIN, "alice", GrantCredits(2, "bonus"))
        except Exception as e:  # surfaced below
            errors.append(e)

    def metering():
        try:
            for minute in range(1, 26):
                credits.meter(T0 + timedelta(minutes=minute))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=grants) for _ in range(2)] + [
        threading.Thread(target=metering)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with db.session() as session:
        rows = session.scalars(select(CreditEntry).order_by(CreditEntry.id)).all()
    assert len([r for r in rows if r.reason == "bonus"]) == 50
    # Every row's balance is the previous balance plus its amount: nothing lost or doubled.
    running = 0
    for row in rows:
        running += row.amount_milli
        assert row.balance_after_milli == running
    # 25 minutes of 15 credits/hour, 100 granted.
    assert balance(users) == pytest.approx(1000 + 100 - 15 * 25 / 60, abs=0.03)
