"""Users appear on first sight with their starting credits; quotas are their own row over
the defaults; usage counts live VMs only; ``me`` and the SSH key are read back."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from twarga_lab.db import Database
from twarga_lab.db.models import VM, CreditEntry, Event, Quota, User, VMStatus
from twarga_lab.schemas import SetSSHKey
from twarga_lab.services import Identity
from twarga_lab.services.users import (
    UserService,
    add_credit_entry,
    balance_milli,
    lock_user,
    usage,
    usage_by_user,
)

DEFAULTS = {"max_vms": 3, "max_ram_mb": 4096}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'users.db'}").open()
    yield database
    database.dispose()


@pytest.fixture
def users(db: Database) -> UserService:
    return UserService(db, starting_credits=12.5, **DEFAULTS)


def add_vm(db: Database, owner_id: int, name: str, status: VMStatus, ram: int, cpu: int = 1):
    with db.session() as session:
        session.add(
            VM(
                owner_id=owner_id,
                name=name,
                domain_name=f"twarga-{owner_id}-{name}",
                image="twarga/tiny",
                os_type="linux",
                ram_mb=ram,
                cpu=cpu,
                disk_gb=2,
                status=status,
            )
        )


def test_a_new_user_gets_starting_credits_once_and_an_event(db, users):
    alice = users.ensure("alice")
    assert users.ensure("alice") == alice
    assert UserService(db, starting_credits=99, **DEFAULTS).ensure("alice") == alice
    with db.session() as session:
        assert balance_milli(session, alice) == 12_500
        assert session.scalar(select(func.count(CreditEntry.id))) == 1
        (event,) = session.scalars(select(Event))
        assert event.message == "new user alice with 12.5 credits"
        assert event.user_name == "alice"


def test_users_created_at_the_same_moment_are_one_user(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'race.db'}").open()
    try:
        services = [UserService(db, starting_credits=1, **DEFAULTS) for _ in range(6)]
        ids: list[int] = []
        barrier = threading.Barrier(len(services))

        def ensure(service: UserService) -> None:
            barrier.wait()
            ids.append(service.ensure("carol"))

        threads = [threading.Thread(target=ensure, args=(s,)) for s in services]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(ids) == 6 and len(set(ids)) == 1
        with db.session() as session:
            assert session.scalar(select(func.count(User.id))) == 1
            assert balance_milli(session, ids[0]) == 1000
    finally:
        db.dispose()


def test_the_ledger_balance_is_the_last_row(db, users):
    alice = users.ensure("alice")
    with db.session() as session:
        lock_user(session, alice)
        entry = add_credit_entry(session, alice, -2_250, "vm web", "system")
        assert entry.balance_after_milli == 10_250
        add_credit_entry(session, alice, 750, "grant", "admin")
    with db.session() as session:
        assert balance_milli(session, alice) == 11_000
        assert session.get(User, alice).lock_version == 1
        assert balance_milli(session, 12345) == 0


def test_quota_is_the_users_own_row_over_the_defaults(db, users):
    alice = users.ensure("alice")
    with db.session() as session:
        assert users.effective_quota(session, alice).to_json() == {
            "max_vms": 3,
            "max_ram_mb": 4096,
            "max_cpu": None,
            "max_disk_gb": None,
        }
        session.add(Quota(user_id=alice, max_vms=1, max_cpu=4, max_disk_gb=40))
    with db.session() as session:
        assert users.effective_quota(session, alice).to_json() == {
            "max_vms": 1,
            "max_ram_mb": 4096,
            "max_cpu": 4,
            "max_disk_gb": 40,
        }


def test_usage_counts_live_vms_only(db, users):
    alice, bob = users.ensure("alice"), users.ensure("bob")
    add_vm(db, alice, "web", VMStatus.running, 512, cpu=2)
    add_vm(db, alice, "db", VMStatus.stopped, 1024)
    add_vm(db, alice, "old", VMStatus.destroyed, 4096, cpu=8)
    add_vm(db, bob, "x", VMStatus.running, 256)
    with db.session() as session:
        assert usage(session, alice).to_json() == {
            "vms": 2,
            "ram_mb": 1536,
            "cpu": 3,
            "disk_gb": 4,
            "snapshot_disk_gb": 0,  # no backend here: snapshots are counted by UserService
        }
        by_user = usage_by_user(session)
        assert by_user[alice] == usage(session, alice)
        assert by_user[bob].to_json() == {
            "vms": 1,
            "ram_mb": 256,
            "cpu": 1,
            "disk_gb": 2,
            "snapshot_disk_gb": 0,
        }
        carol = users.ensure("carol")
        assert carol not in by_user
        assert usage(session, carol).to_json() == {
            "vms": 0,
            "ram_mb": 0,
            "cpu": 0,
            "disk_gb": 0,
            "snapshot_disk_gb": 0,
        }


def test_me_and_the_ssh_key(users):
    me = users.me(Identity("alice", admin=True))
    assert {k: me[k] for k in ("name", "admin", "credits", "ssh_public_key")} == {
        "name": "alice",
        "admin": True,
        "credits": 12.5,
        "ssh_public_key": None,
    }
    assert me["quota"]["max_vms"] == 3 and me["usage"]["vms"] == 0
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ5 alice@laptop"
    assert users.set_ssh_key(Identity("alice"), SetSSHKey(key))["ssh_public_key"] == key
    assert users.me(Identity("alice"))["admin"] is False
    assert users.set_ssh_key(Identity("alice"), SetSSHKey(None))["ssh_public_key"] is None
