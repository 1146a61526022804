"""The SOC service on SQLite: who sees which events, paging and filters, SSH activity into
security events with fail2ban-style brute-force detection, unattributed network lines,
bans, statistics, exports, flood notices and pruning."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from twarga_lab.db import Database
from twarga_lab.db.models import VM, AuthFailure, Event, User, VMStatus
from twarga_lab.errors import Forbidden
from twarga_lab.schemas.soc import EventQuery
from twarga_lab.services import Identity
from twarga_lab.services.bans import record_failure
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.soc import FloodNotice, SocService, SshObservation
from twarga_lab.services.sshlog import SshEvent, SshEventKind

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ALICE, BOB, ADMIN = Identity("alice"), Identity("bob"), Identity("root", admin=True)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'soc.db'}").open()
    yield database
    database.dispose()


@pytest.fixture
def soc(db: Database) -> SocService:
    return SocService(db, maxretry=3, findtime=60.0, bantime=100.0)


@pytest.fixture
def vms(db: Database) -> dict[str, int]:
    """alice owns web, bob owns db; a destroyed VM of alice's too."""
    ids = {}
    with db.session() as session:
        for owner, name, status in [
            ("alice", "web", VMStatus.running),
            ("bob", "db", VMStatus.running),
            ("alice", "old", VMStatus.destroyed),
        ]:
            user = session.scalar(select(User).where(User.name == owner))
            if user is None:
                user = User(name=owner)
                session.add(user)
                session.flush()
            vm = VM(
                owner_id=user.id, name=name, domain_name=f"twarga-{user.id}-{name}",
                image="twarga/tiny", os_type="linux", ram_mb=256, cpu=1, disk_gb=1,
                status=status,
            )  # fmt: skip
            session.add(vm)
            session.flush()
            ids[name] = vm.id
    return ids


def add_events(db: Database, vms: dict[str, int]) -> None:
    with db.session() as session:
        record_event(session, EventType.vm, Severity.info, "alice made web",
                     user_name="alice", vm_id=vms["web"])  # fmt: skip
        record_event(session, EventType.auth, Severity.warning, "alice typo",
                     user_name="alice")  # fmt: skip
        record_event(session, EventType.security, Severity.critical, "attack on db",
                     user_name="bob", vm_id=vms["db"], source="10.0.0.9")  # fmt: skip
        record_event(session, EventType.security, Severity.warning, "scan of web",
                     vm_id=vms["web"], source="10.0.0.9")  # fmt: skip
        record_event(session, EventType.system, Severity.info, "service started")


def messages(events: list[dict]) -> list[str]:
    return [e["message"] for e in events]


def test_users_see_their_own_events_and_their_vms_admins_everything(db, soc, vms):
    add_events(db, vms)
    assert messages(soc.list_events(ALICE, EventQuery())) == [
        "scan of web",
        "alice typo",
        "alice made web",
    ]
    assert messages(soc.list_events(BOB, EventQuery())) == ["attack on db"]
    assert len(soc.list_events(ADMIN, EventQuery())) == 5
    assert soc.list_events(Identity("carol"), EventQuery()) == []
    event = soc.list_events(BOB, EventQuery())[0]
    assert set(event) == {
        "id", "created_at", "type", "severity", "message", "user_name", "vm_id", "source",
        "details",
    }  # fmt: skip
    assert (event["vm_id"], event["source"], event["details"]) == (vms["db"], "10.0.0.9", {})


def test_filters_and_cursors(db, soc, vms):
    add_events(db, vms)
    assert messages(soc.list_events(ADMIN, EventQuery(severity="warning"))) == [
        "scan of web",
        "alice typo",
    ]
    assert messages(soc.list_events(ADMIN, EventQuery(type="security"))) == [
        "scan of web",
        "attack on db",
    ]
    assert messages(soc.list_events(ALICE, EventQuery(vm_id=vms["web"]))) == [
        "scan of web",
        "alice made web",
    ]
    assert soc.list_events(ALICE, EventQuery(vm_id=vms["db"])) == []  # not hers
    everything = soc.list_events(ADMIN, EventQuery())
    page = soc.list_events(ADMIN, EventQuery(limit=2, before_id=everything[1]["id"]))
    assert messages(page) == messages(everything[2:4])
    tail = soc.list_events(ALICE, EventQuery(since_id=everything[-1]["id"]))
    assert messages(tail) == ["alice typo", "scan of web"]  # after the first, oldest first


def failed(source: str = "203.0.113.5", user: str = "root") -> SshEvent:
    return SshEvent(
        SshEventKind.failed, "sshd", source, port=40022, user=user, method="password",
        counts=True, hostname="web",
    )  # fmt: skip


def test_ssh_failures_on_a_vm_become_events_and_a_brute_force_ban(db, soc, vms):
    observations = [
        SshObservation(failed(), "virtio", vm_id=vms["web"], received_at=T0 + timedelta(seconds=i))
        for i in range(3)
    ]
    assert soc.record_ssh(observations) == 4  # three failures and the brute-force event
    events = soc.list_events(ALICE, EventQuery())
    brute = events[0]
    assert brute["severity"] == "critical" and brute["details"]["action"] == "ssh_bruteforce"
    assert brute["message"].startswith("SSH brute force on VM web from 203.0.113.5: 3 failures")
    assert brute["details"]["enforced"] is False and brute["details"]["ban_count"] == 1
    first = events[-1]
    assert first["message"] == "failed SSH login to VM web as root from 203.0.113.5 (password)"
    assert first["severity"] == "warning" and first["user_name"] == "alice"
    assert first["details"]["failures_in_window"] == 1 and first["details"]["counted"] is True
    (ban,) = soc.list_bans(ALICE, now=T0 + timedelta(seconds=10))
    assert ban["vm_name"] == "web" and ban["source"] == "203.0.113.5" and ban["active"]
    assert ban["enforced"] is False
    assert soc.list_bans(ALICE, now=T0 + timedelta(seconds=200))[0]["active"] is False
    assert soc.list_bans(BOB) == []
    assert len(soc.list_bans(ADMIN)) == 1


def test_an_accepted_login_from_a_banned_source_says_so(db, soc, vms):
    soc.record_ssh(
        [SshObservation(failed(), "virtio", vm_id=vms["web"], received_at=T0) for _ in range(3)]
    )
    accepted = SshEvent(SshEventKind.accepted, "sshd", "203.0.113.5", user="root",
                        method="password", hostname="web")  # fmt: skip
    soc.record_ssh(
        [SshObservation(accepted, "virtio", vm_id=vms["web"], received_at=T0 + timedelta(1e-3))]
    )
    (event,) = soc.list_events(ALICE, EventQuery(limit=1))
    assert event["severity"] == "info" and "source_banned_until" in event["details"]


def test_network_lines_without_a_trusted_domain_belong_to_no_vm(db, soc, vms):
    # The hostname names alice's VM, but a hostname alone proves nothing.
    line = SshObservation(failed(), "udp", peer="127.0.0.1")
    trusted = SshObservation(failed(), "udp", peer="127.0.0.1", domain="twarga-2-db")
    gone = SshObservation(failed(), "virtio", vm_id=vms["old"])
    assert soc.record_ssh([line, trusted, gone]) == 3
    assert messages(soc.list_events(ALICE, EventQuery())) == []
    assert messages(soc.list_events(BOB, EventQuery())) == [
        "failed SSH login to VM db as root from 203.0.113.5 (password)"
    ]
    system = soc.list_events(ADMIN, EventQuery(type="system"))
    assert [e["details"]["action"] for e in system] == ["syslog_unattributed"] * 2
    assert "its sender is not in syslog_trusted_sources" in system[1]["message"]
    assert "its VM is gone" in system[0]["message"]
    with db.session() as session:  # only the attributed failure counts
        assert session.scalar(select(func.count(AuthFailure.id))) == 1


def test_connection_lines_are_not_events(soc, vms):
    hello = SshEvent(SshEventKind.connection, "sshd", "203.0.113.5")
    assert soc.record_ssh([SshObservation(hello, "virtio", vm_id=vms["web"])]) == 0


def test_statistics_are_for_admins(db, soc, vms):
    with pytest.raises(Forbidden):
        soc.statistics(ALICE)
    add_events(db, vms)
    stats = soc.statistics(ADMIN, now=datetime.now(UTC))
    assert stats["total_events"] == 5
    assert stats["by_severity"] == {"info": 2, "warning": 2, "critical": 1}
    assert stats["by_type"] == {"vm": 1, "auth": 1, "system": 1, "security": 2}
    assert messages(stats["recent_critical"]) == ["attack on db"]
    assert len(stats["per_hour"]) == 24 and stats["per_hour"][-1]["count"] == 5
    assert stats["per_hour"][-1]["critical"] == 1
    assert stats["top_sources"] == [{"source": "10.0.0.9", "count": 2}]
    assert stats["active_bans"] == 0


async def test_exports_page_through_every_visible_event(db, soc, vms):
    add_events(db, vms)
    chunks = [c async for c in soc.export(ALICE, EventQuery(limit=100), "csv", page_size=2)]
    assert len(chunks) == 2
    rows = list(csv.reader(io.StringIO("".join(chunks))))
    assert rows[0] == [
        "id", "created_at", "type", "severity", "message", "user_name", "vm_id", "source",
        "details",
    ]  # fmt: skip
    assert [r[4] for r in rows[1:]] == ["scan of web", "alice typo", "alice made web"]
    lines = [c async for c in soc.export(ADMIN, EventQuery(limit=4), "json", page_size=3)]
    records = [json.loads(line) for line in "".join(lines).splitlines()]
    assert len(records) == 4
    assert records == soc.list_events(ADMIN, EventQuery(limit=4))


def test_a_flood_notice_is_one_warning_for_the_vms_owner(soc, vms):
    notices = [
        FloodNotice("virtio", vms["web"], None, queue_size=500, rate=50.0),
        FloodNotice("udp", None, "127.0.0.1", queue_size=500, rate=50.0),
    ]
    assert soc.record_floods(notices) == 2
    (mine,) = soc.list_events(ALICE, EventQuery())
    assert mine["message"].startswith("the syslog channel of VM web floods the SOC")
    assert mine["severity"] == "warning" and mine["details"]["action"] == "syslog_flood"
    network = soc.list_events(ADMIN, EventQuery(limit=1))[0]
    assert network["message"].startswith("syslog sender 127.0.0.1 (udp) floods the SOC")
    assert network["source"] == "127.0.0.1"


def test_pruning_deletes_old_events_and_stale_vm_failures_only(db, soc, vms):
    now = datetime.now(UTC)
    with db.session() as session:
        for age_days in (100, 95, 1):
            session.add(Event(type="system", severity="info", message=f"{age_days} days",
                              created_at=now - timedelta(days=age_days)))  # fmt: skip
        record_failure(session, soc.policy, f"vm:{vms['web']}", "10.0.0.1",
                       now=now - timedelta(seconds=120))  # fmt: skip
        record_failure(session, soc.policy, f"vm:{vms['web']}", "10.0.0.2",
                       now=now - timedelta(seconds=10))  # fmt: skip
        record_failure(session, soc.policy, "hub", "10.0.0.3", now=now - timedelta(days=3))
    assert soc.prune(timedelta(days=90), now=now, batch=1) == (2, 1)
    assert messages(soc.list_events(ADMIN, EventQuery())) == ["1 days"]
    with db.session() as session:
        left = {(f.scope, f.source) for f in session.scalars(select(AuthFailure))}
    assert left == {(f"vm:{vms['web']}", "10.0.0.2"), ("hub", "10.0.0.3")}
