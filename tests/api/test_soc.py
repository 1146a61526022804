"""The SOC API: who sees which events, filters and paging, statistics that match the rows,
exports that round-trip, and SSH syslog over the network receiver (UDP and TCP) from
senders trusted for a VM (``syslog_trusted_sources``) with brute-force detection, on
libvirt's test driver. Attacks on the receiver are in ``test_syslog_attacks.py``."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import socket
import time
from datetime import timedelta
from typing import Any

import jsonschema
import pytest
from sqlalchemy import func, select

from tests.helpers import wait_for, wait_status
from tests.identity import auth
from twarga_lab.db import Database, Event
from twarga_lab.db.models import VM, User, utcnow
from twarga_lab.event_schemas import EVENT_TYPES, load_schema
from twarga_lab.services.bans import active_ban
from twarga_lab.services.soc import SocService, SshObservation
from twarga_lab.services.sshlog import SshLogParser

FAILED = (
    "<84>Nov 27 08:00:0{n} {host} dropbear[{pid}]: "
    "Bad password attempt for 'root' from {ip}:4{n}000"
)


async def create_vm(api: Any, user: str, name: str) -> dict[str, Any]:
    """A running VM (so no background event lands in the middle of a test's counting)."""
    reply = await api("POST", "vms", user=user, body={"name": name})
    assert reply.status == 201, reply.json
    return await wait_status(api, reply.json["id"], "running", user=user)


def send_udp(port: int, *lines: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for line in lines:
            sock.sendto(line.encode(), ("127.0.0.1", port))


async def events(api: Any, user: str, **params: str) -> list[dict[str, Any]]:
    reply = await api("GET", "soc/events", user=user, params=params or None)
    assert reply.status == 200, reply.json
    return reply.json


async def fetch_text(jp_fetch: Any, user: str, name: str, **params: str) -> tuple[str, Any]:
    response = await jp_fetch(
        "twarga", "api", "soc", name, headers=auth(f"{user}-token"), params=params or None
    )
    return response.body.decode(), response.headers


def trust_loopback(twarga: Any, *vms: dict[str, Any]) -> None:
    """Let 127.0.0.1 speak for ``vms`` (this test's senders are the only local accounts)."""
    twarga.syslog_trusted_sources = {vm["domain"]: ["127.0.0.1"] for vm in vms}


def receiver_port(twarga: Any, kind: str = "udp") -> int:
    receiver = twarga.services.syslog.receiver
    assert receiver is not None
    return receiver.udp_port if kind == "udp" else receiver.tcp_port


async def test_users_see_their_own_events_and_admins_everything(api, twarga):
    alice_vm = await create_vm(api, "alice", "web")
    bob_vm = await create_vm(api, "bob", "db")
    # Both VMs trust 127.0.0.1: among them, the line's hostname (the domain) picks one.
    trust_loopback(twarga, alice_vm, bob_vm)
    send_udp(
        receiver_port(twarga),
        FAILED.format(n=1, host=alice_vm["domain"], pid=7, ip="10.0.2.2"),
        FAILED.format(n=2, host=bob_vm["domain"], pid=8, ip="10.0.2.2"),
    )

    async def both_arrived() -> list[dict[str, Any]] | None:
        seen = await events(api, "admin", type="security")
        return seen if len(seen) >= 2 else None

    await wait_for(both_arrived, timeout=5)
    for user, mine, theirs in (("alice", alice_vm, bob_vm), ("bob", bob_vm, alice_vm)):
        seen = await events(api, user, limit="1000")
        assert seen, user
        assert all(e["user_name"] == user or e["vm_id"] == mine["id"] for e in seen)
        assert not [e for e in seen if e["vm_id"] == theirs["id"] or e["user_name"] != user]
        ssh = [e for e in seen if e["type"] == "security"]
        assert [(e["vm_id"], e["severity"], e["source"]) for e in ssh] == [
            (mine["id"], "warning", "10.0.2.2")
        ]
        assert ssh[0]["details"]["channel"] == "udp" and ssh[0]["details"]["login"] == "root"
        # Asking for someone else's VM gives nothing, not their events.
        assert await events(api, user, vm_id=str(theirs["id"])) == []
    everyone = await events(api, "admin", limit="1000")
    assert {alice_vm["id"], bob_vm["id"]} <= {e["vm_id"] for e in everyone}
    for event in everyone:
        jsonschema.validate(event, load_schema(event["type"]))


async def test_brute_force_over_udp_raises_one_critical_event_and_a_ban(api, twarga):
    vm = await create_vm(api, "alice", "target")
    trust_loopback(twarga, vm)
    port = receiver_port(twarga)
    started = 0.0
    for n in range(1, 7):
        if n == 5:
            started = time.monotonic()
        send_udp(port, FAILED.format(n=n, host=vm["domain"], pid=100 + n, ip="203.0.113.9"))
        if n == 5:
            alarm = await wait_for(lambda: _critical(api, vm["id"]), timeout=1.0, interval=0.01)
            assert time.monotonic() - started < 1.0
    failures = await wait_for(lambda: _failures(api, vm["id"], 6), timeout=5)
    assert [e["details"]["failures_in_window"] for e in failures] == [1, 2, 3, 4, 5, 1]
    critical = await _critical(api, vm["id"])
    assert len(critical) == 1
    (alarm,) = critical
    assert alarm["source"] == "203.0.113.9" and "target" in alarm["message"]
    assert alarm["details"]["enforced"] is False and alarm["details"]["scope"] == f"vm:{vm['id']}"
    jsonschema.validate(alarm, load_schema("security"))

    bans = (await api("GET", "soc/bans")).json
    assert [
        (b["vm_id"], b["source"], b["ban_count"], b["active"], b["enforced"]) for b in bans
    ] == [(vm["id"], "203.0.113.9", 1, True, False)]
    assert (await api("GET", "soc/bans", user="bob")).json == []
    assert len((await api("GET", "soc/bans", user="admin")).json) == 1


async def _critical(api: Any, vm_id: int) -> list[dict[str, Any]]:
    return await events(api, "alice", severity="critical", vm_id=str(vm_id))


async def _failures(api: Any, vm_id: int, count: int) -> list[dict[str, Any]] | None:
    seen = await events(api, "alice", severity="warning", type="security", vm_id=str(vm_id))
    return sorted(seen, key=lambda e: e["id"]) if len(seen) >= count else None


async def test_tcp_octet_counting_and_line_framing(api, twarga):
    vm = await create_vm(api, "alice", "framed")
    trust_loopback(twarga, vm)
    accepted = (
        f"<86>1 2026-11-27T08:00:01Z {vm['domain']} sshd 42 - - Accepted publickey for root "
        "from 192.0.2.4 port 50000 ssh2: ED25519 SHA256:abc"
    ).encode()
    failed = (
        f"<38>Nov 27 08:00:02 {vm['domain']} sshd[43]: "
        "Failed password for root from 192.0.2.5 port 50001 ssh2\n"
    )
    _, writer = await asyncio.open_connection("127.0.0.1", receiver_port(twarga, "tcp"))
    # One octet-counted frame split across two writes, then a newline-framed message.
    frame = str(len(accepted)).encode() + b" " + accepted
    writer.write(frame[:20])
    await writer.drain()
    writer.write(frame[20:] + failed.encode())
    await writer.drain()

    async def two() -> list[dict[str, Any]] | None:
        seen = await events(api, "alice", type="security", vm_id=str(vm["id"]))
        return seen if len(seen) == 2 else None

    seen = await wait_for(two, timeout=5)
    writer.close()
    by_action = {e["details"]["action"]: e for e in seen}
    assert by_action["ssh_accepted"]["severity"] == "info"
    assert by_action["ssh_accepted"]["source"] == "192.0.2.4"
    assert by_action["ssh_accepted"]["details"]["channel"] == "tcp"
    assert by_action["ssh_failed"]["source"] == "192.0.2.5"


async def test_a_hostname_alone_names_no_vm(api, twarga):
    alice_vm = await create_vm(api, "alice", "twin")
    await create_vm(api, "bob", "twin")
    # Nothing trusted: neither the VM name nor the unique domain name ties a line to a VM.
    send_udp(
        receiver_port(twarga),
        FAILED.format(n=1, host="twin", pid=1, ip="198.51.100.1"),
        FAILED.format(n=2, host=alice_vm["domain"], pid=2, ip="198.51.100.1"),
    )

    async def arrived() -> list[dict[str, Any]] | None:
        seen = await events(api, "admin", type="system")
        seen = [e for e in seen if e["details"].get("action") == "syslog_unattributed"]
        return seen if len(seen) == 2 else None

    for event in await wait_for(arrived, timeout=5):
        assert event["vm_id"] is None and event["user_name"] is None
        assert event["severity"] == "info" and event["details"]["ssh_action"] == "ssh_failed"
        assert event["details"]["channel"] == "udp" and event["details"]["peer"] == "127.0.0.1"
        jsonschema.validate(event, load_schema("system"))
    assert await events(api, "admin", type="security") == []
    for user in ("alice", "bob"):
        seen = await events(api, user)
        assert [e for e in seen if e["type"] == "security" or "syslog" in str(e["details"])] == []
    assert (await api("GET", "soc/bans", user="admin")).json == []


async def test_filters_paging_and_tail(api, twarga):
    for i in range(5):
        await create_vm(api, "alice", f"vm-{i}")
    newest_first = await events(api, "alice", limit="3")
    assert len(newest_first) == 3
    assert [e["id"] for e in newest_first] == sorted((e["id"] for e in newest_first), reverse=True)
    older = await events(api, "alice", limit="3", before_id=str(newest_first[-1]["id"]))
    assert older and max(e["id"] for e in older) < newest_first[-1]["id"]
    oldest = min(e["id"] for e in older)
    tail = await events(api, "alice", since_id=str(oldest))
    assert [e["id"] for e in tail] == sorted(e["id"] for e in tail)
    assert min(e["id"] for e in tail) > oldest
    assert all(e["type"] == "vm" for e in await events(api, "alice", type="vm"))
    assert all(e["severity"] == "info" for e in await events(api, "alice", severity="info"))

    for params, status in (
        ({"limit": "0"}, 422),
        ({"limit": "1001"}, 422),
        ({"limit": "many"}, 400),
        ({"severity": "loud"}, 422),
        ({"type": "weird"}, 422),
        ({"since_id": "1", "before_id": "9"}, 422),
    ):
        reply = await api("GET", "soc/events", params=params)
        assert reply.status == status, (params, reply.json)
        assert set(reply.json) >= {"message", "reason"}


async def test_statistics_are_for_admins_and_match_the_rows(api, twarga):
    reply = await api("GET", "soc/statistics", user="alice")
    assert reply.status == 403
    assert reply.json["reason"] == "admin_required"

    vm = await create_vm(api, "alice", "counted")
    trust_loopback(twarga, vm)
    send_udp(
        receiver_port(twarga),
        *[FAILED.format(n=n, host=vm["domain"], pid=n, ip="192.0.2.66") for n in range(1, 6)],
    )
    await wait_for(lambda: _critical(api, vm["id"]), timeout=5)
    stats = (await api("GET", "soc/statistics", user="admin")).json

    with twarga.services.db.session() as session:
        rows = session.execute(select(Event.type, Event.severity, Event.created_at)).all()
        total = session.scalar(select(func.count(Event.id)))
    assert stats["total_events"] == total == len(rows)
    for severity in ("info", "warning", "critical"):
        assert stats["by_severity"][severity] == sum(1 for r in rows if r.severity == severity)
    for type_ in EVENT_TYPES:
        assert stats["by_type"][type_] == sum(1 for r in rows if r.type == type_)
    assert len(stats["per_hour"]) == 24
    assert sum(b["count"] for b in stats["per_hour"]) == len(rows)
    # Everything happened just now: in the current hour (or the one before, at :00).
    assert sum(b["count"] for b in stats["per_hour"][-2:]) == len(rows)
    assert sum(b["critical"] for b in stats["per_hour"]) == stats["by_severity"]["critical"] == 1
    assert [e["severity"] for e in stats["recent_critical"]] == ["critical"]
    assert stats["top_sources"][0] == {"source": "192.0.2.66", "count": 6}  # 5 + the alarm
    assert stats["active_bans"] == 1


async def test_csv_and_jsonl_exports_round_trip(api, twarga, jp_fetch):
    vm = await create_vm(api, "alice", "export-me")
    await create_vm(api, "bob", "not-yours")
    trust_loopback(twarga, vm)
    send_udp(
        receiver_port(twarga),
        FAILED.format(n=1, host=vm["domain"], pid=1, ip="192.0.2.1").replace("root", 'ro,"ot'),
    )
    await wait_for(lambda: events(api, "alice", type="security"), timeout=5)
    listed = await events(api, "alice", limit="1000")

    text, headers = await fetch_text(jp_fetch, "alice", "events.csv")
    assert headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [int(r["id"]) for r in rows] == [e["id"] for e in listed]
    for row, event in zip(rows, listed, strict=True):
        assert json.loads(row["details"]) == event["details"]
        assert row["message"] == event["message"]
        assert row["user_name"] == (event["user_name"] or "")
        assert row["vm_id"] == ("" if event["vm_id"] is None else str(event["vm_id"]))
        assert row["created_at"] == event["created_at"]

    text, headers = await fetch_text(jp_fetch, "alice", "events.jsonl")
    assert headers["Content-Type"].startswith("application/x-ndjson")
    assert [json.loads(line) for line in text.splitlines()] == listed

    # Same filters as the listing, paged internally.
    text, _ = await fetch_text(jp_fetch, "alice", "events.jsonl", type="security", limit="1")
    assert [json.loads(line)["type"] for line in text.splitlines()] == ["security"]
    text, _ = await fetch_text(jp_fetch, "bob", "events.jsonl")
    assert all(json.loads(line)["user_name"] == "bob" for line in text.splitlines())


async def test_credentials_are_for_the_owner_only(api, twarga):
    vm = await create_vm(api, "alice", "secret")
    reply = await api("GET", f"vms/{vm['id']}/credentials")
    assert reply.status == 200
    assert {k: reply.json[k] for k in ("username", "password", "ssh_host", "ssh_port")} == {
        "username": "root",
        "password": reply.json["password"],
        "ssh_host": "127.0.0.1",
        "ssh_port": vm["ssh_port"],
    }
    assert len(reply.json["password"]) >= 20
    for user in ("bob", "admin"):
        other = await api("GET", f"vms/{vm['id']}/credentials", user=user)
        assert other.status == 404 and other.json["reason"] == "no_vm"
    assert (await api("GET", "vms/99999/credentials")).status == 404
    (read,) = await events(api, "alice", type="security")
    assert read["details"] == {"action": "credentials_read", "actor": "alice"}
    assert reply.json["password"] not in json.dumps(await events(api, "admin", limit="1000"))


def test_bans_and_counts_survive_a_restart_and_double(tmp_path):
    url = f"sqlite:///{tmp_path / 'soc.db'}"
    policy = {"maxretry": 5, "findtime": 600.0, "bantime": 600.0}
    line = "<84>Nov 27 08:00:01 h dropbear[1]: Bad password attempt for 'root' from 10.0.2.2:1"
    event = SshLogParser().parse_line(line)
    start = utcnow()

    db = Database(url).open()
    with db.session() as session:
        owner = User(name="carol")
        vm = VM(owner=owner, name="h", domain_name="twarga-1-h", image="twarga/tiny",
                os_type="linux", ram_mb=512, cpu=1, disk_gb=10)  # fmt: skip
        session.add(vm)
        session.flush()
        scope = f"vm:{vm.id}"

    def fail(soc: SocService, at_seconds: float) -> None:
        observation = SshObservation(
            event, "udp", received_at=start + timedelta(seconds=at_seconds), domain="twarga-1-h"
        )
        soc.record_ssh([observation])

    soc = SocService(db, **policy)
    for second in range(5):
        fail(soc, second)
    db.dispose()

    db = Database(url).open()  # a new service on the same database
    soc = SocService(db, **policy)
    with db.session() as session:
        ban = active_ban(session, scope, "10.0.2.2", start + timedelta(seconds=10))
        assert ban is not None and ban.ban_count == 1
        assert ban.banned_until == start + timedelta(seconds=4 + 600)
    # Repeat offender: five more failures after the first ban ended -> twice as long.
    for second in range(700, 705):
        fail(soc, second)
    with db.session() as session:
        ban = active_ban(session, scope, "10.0.2.2", start + timedelta(seconds=710))
        assert ban is not None and ban.ban_count == 2
        assert ban.banned_until == start + timedelta(seconds=704 + 1200)
        alarms = session.scalars(select(Event).where(Event.severity == "critical")).all()
    assert [a.details["bantime"] for a in alarms] == [600, 1200]
    db.dispose()


@pytest.mark.parametrize("address", ["localhost:5514", "127.0.0.1", "127.0.0.1:99999"])
def test_bad_syslog_addresses_are_refused(address):
    from traitlets import TraitError

    from twarga_lab.app import TwargaLabApp

    with pytest.raises(TraitError):
        TwargaLabApp(syslog_address=address)
    assert TwargaLabApp().syslog_address == "127.0.0.1:5514"
