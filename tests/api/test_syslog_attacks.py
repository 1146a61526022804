"""Attacks on the SOC's syslog intake, done for real from an unprivileged local account
(every Hub user can run code on the host and reach 127.0.0.1:5514):

- forged sshd/dropbear lines over UDP and TCP naming another tenant's VM are no event and
  no ban of that VM (only senders in ``syslog_trusted_sources`` speak for a VM);
- a UDP flood from one sender does not delay a VM channel's line, and is reported once;
- a silent or slowloris TCP connection is closed after ``syslog_tcp_timeout``;
- old events and failure counts are pruned by age, young ones kept.

On libvirt's test driver, which runs no guest: the VM channel is a UNIX socket the test
listens on, read by the service's own channel reader exactly as QEMU's would be.
"""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from sqlalchemy import func, insert, select

from tests.api.test_soc import create_vm, events, receiver_port
from tests.helpers import wait_for
from tests.throwaway import PYTHON, python_as, run_as, throwaway_user, udp_flood
from twarga_lab.db import Event
from twarga_lab.db.models import AuthFailure, utcnow
from twarga_lab.event_schemas import load_schema

TCP_TIMEOUT = 0.5
SECRET = "s3cret-for-alice-only"


@pytest.fixture
def twarga_config() -> dict[str, Any]:
    return {
        "syslog_tcp_timeout": TCP_TIMEOUT,
        "soc_prune_interval": 0.2,
        "soc_event_retention_days": 90.0,
        "bruteforce_findtime": 600.0,
    }


@pytest.fixture
def tenant() -> Any:
    with throwaway_user() as name:
        yield name


def forged(host: str, n: int, *, sd: str = "-") -> list[str]:
    """Six wrong passwords 'in' ``host``: sshd in RFC 3164 and 5424, dropbear."""
    return [
        *(f"<38>Nov 27 08:00:0{i} {host} sshd[{100 + i}]: Failed password for root from "
          f"203.0.113.{n} port 4{i}000 ssh2" for i in range(3)),
        *(f"<38>1 2026-11-27T08:00:0{i}Z {host} sshd {200 + i} - {sd} Failed password for "
          f"root from 203.0.113.{n} port 5{i}000 ssh2" for i in range(3)),
    ]  # fmt: skip


SENDER = """
import socket, sys
port, tcp_port, lines = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
    for line in lines:
        udp.sendto(line.encode(), ("127.0.0.1", port))
with socket.create_connection(("127.0.0.1", tcp_port)) as tcp:
    for line in lines:
        frame = line.encode()
        tcp.sendall(str(len(frame)).encode() + b" " + frame)
print("sent", len(lines) * 2)
"""


async def send_as(user: str, twarga: Any, lines: list[str]) -> None:
    ports = (str(receiver_port(twarga)), str(receiver_port(twarga, "tcp")))
    code, out = await run_as(user, PYTHON, "-c", SENDER, *ports, *lines)
    assert code == 0 and "sent" in out, out


def unattributed(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in seen if e["details"].get("action") == "syslog_unattributed"]


async def test_forged_lines_from_another_account_are_no_vms_events_or_bans(api, twarga, tenant):
    bob_vm = await create_vm(api, "bob", "db")
    alice_vm = await create_vm(api, "alice", "web")
    # Alice's VM trusts a secret; Bob's trusts nothing: his VM's channel is its only voice.
    twarga.syslog_trusted_sources = {alice_vm["domain"]: [f"secret:{SECRET}"]}

    # The tenant forges for Bob's VM (by domain and by name) and for Alice's without the
    # secret (and with a wrong one), over UDP and TCP.
    lines = [
        *forged(bob_vm["domain"], 1), *forged("db", 2),
        *forged(alice_vm["domain"], 3, sd='[twarga@32473 secret="guessed-but-wrong!"]'),
    ]  # fmt: skip
    await send_as(tenant, twarga, lines)

    async def all_recorded() -> list[dict[str, Any]] | None:
        seen = unattributed(await events(api, "admin", type="system", limit="1000"))
        return seen if len(seen) >= 2 * len(lines) else None

    recorded = await wait_for(all_recorded, timeout=10)
    for event in recorded:
        assert event["vm_id"] is None and event["user_name"] is None
        assert event["details"]["peer"] == "127.0.0.1"
        jsonschema.validate(event, load_schema("system"))
    assert {event["details"]["channel"] for event in recorded} == {"udp", "tcp"}
    assert await events(api, "admin", type="security") == []
    assert (await api("GET", "soc/bans", user="admin")).json == []
    for user, vm in (("bob", bob_vm), ("alice", alice_vm)):
        assert await events(api, user, vm_id=str(vm["id"]), type="security") == []
        assert [e for e in await events(api, user) if "syslog" in str(e["details"])] == []
    with twarga.services.db.session() as session:
        assert session.scalar(select(func.count(AuthFailure.id))) == 0

    # The holder of Alice's secret does speak for her VM (and only hers).
    good = forged("anything", 4, sd=f'[twarga@32473 secret="{SECRET}"]')[3:]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for line in good:
            sock.sendto(line.encode(), ("127.0.0.1", receiver_port(twarga)))

    async def alices() -> list[dict[str, Any]] | None:
        seen = await events(api, "alice", vm_id=str(alice_vm["id"]), type="security")
        return seen if len(seen) == 3 else None

    for event in await wait_for(alices, timeout=5):
        assert event["details"]["channel"] == "udp" and event["source"] == "203.0.113.4"
    assert await events(api, "bob", type="security") == []


async def test_a_udp_flood_does_not_delay_a_vm_channel(api, twarga, tenant, tmp_path):
    vm = await create_vm(api, "alice", "quiet")
    channel = await GuestChannel.open(twarga, vm, tmp_path / "channel.sock")
    flood = asyncio.ensure_future(python_as(tenant, udp_flood(receiver_port(twarga), 4)))
    ingest = twarga.services.syslog.ingest

    async def flooding() -> bool:
        return ingest.dropped["network"] > 1000

    await wait_for(flooding, timeout=5, interval=0.05)

    # Mid-flood, the guest's syslogd writes one line: it is an event within a second.
    sent = time.monotonic()
    channel.write(
        b"Nov 27 08:00:01 quiet auth.info dropbear[77]: Bad password attempt for 'root' "
        b"from 10.0.2.2:40000\n"
    )

    async def arrived() -> list[dict[str, Any]] | None:
        seen = await events(api, "alice", vm_id=str(vm["id"]), type="security")
        return seen or None

    (event,) = await wait_for(arrived, timeout=1.0, interval=0.02)
    latency = time.monotonic() - sent
    assert not flood.done(), "the flood ended before the guest's line was checked"
    print(f"\nguest line recorded {latency * 1000:.0f} ms after it was written, mid-flood")
    assert event["details"]["channel"] == "virtio" and event["source"] == "10.0.2.2"
    sent_count = int(await flood)
    channel.close()

    dropped = ingest.dropped["network"]
    print(f"flood: {sent_count} datagrams sent, {dropped} dropped by the receiver")
    assert dropped > 0 and ingest.dropped["virtio"] == 0
    # One warning for the whole burst; the flood's lines are no event of the VM.
    floods = [
        e for e in await events(api, "admin", type="system", limit="1000")
        if e["details"].get("action") == "syslog_flood"
    ]  # fmt: skip
    assert len(floods) == 1
    assert floods[0]["severity"] == "warning" and floods[0]["details"]["peer"] == "127.0.0.1"
    jsonschema.validate(floods[0], load_schema("system"))
    assert len(await events(api, "alice", vm_id=str(vm["id"]), type="security")) == 1
    exposition = twarga.services.metrics.prometheus_text().decode().splitlines()
    (counter,) = [
        line for line in exposition
        if line.startswith('twarga_syslog_dropped_lines_total{channel="network"}')
    ]  # fmt: skip
    assert float(counter.split()[-1]) >= dropped  # datagrams still queued in the kernel


async def test_silent_and_slowloris_tcp_connections_are_closed(twarga):
    port = receiver_port(twarga, "tcp")
    receiver = twarga.services.syslog.receiver

    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(1), timeout=5) == b""  # closed by the server
    silent = time.monotonic() - started
    writer.close()

    # A sender that keeps the connection busy but never finishes a message.
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    closed = asyncio.ensure_future(reader.read(1))
    for byte in b"<38>Nov 27 08:00:00 x sshd[1]: slow":
        if closed.done():
            break
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(TCP_TIMEOUT / 5)
    assert await asyncio.wait_for(closed, timeout=5) == b""
    slow = time.monotonic() - started
    writer.close()
    print(f"\nclosed after {silent:.2f} s (silent) and {slow:.2f} s (slowloris)")
    assert TCP_TIMEOUT * 0.9 <= silent < TCP_TIMEOUT + 1.5
    assert TCP_TIMEOUT * 0.9 <= slow < TCP_TIMEOUT + 1.5
    assert receiver.timeouts == 2


async def test_old_events_and_failures_are_pruned_young_ones_kept(twarga):
    db = twarga.services.db
    now = utcnow()
    old, young = now - timedelta(days=91), now - timedelta(days=89)
    rows = [
        {"created_at": at, "type": "system", "severity": "info", "message": f"m{i}",
         "details": {"age": label}}
        for i, (at, label) in enumerate([(old, "old")] * 3 + [(young, "young")] * 2)
    ]  # fmt: skip
    failures = [
        {"scope": "vm:1", "source": "10.0.2.2", "ts": now - timedelta(seconds=601)},
        {"scope": "vm:1", "source": "10.0.2.2", "ts": now - timedelta(seconds=30)},
        {"scope": "hub", "source": "192.0.2.1", "ts": now - timedelta(seconds=601)},
    ]
    with db.session() as session:
        session.execute(insert(Event), rows)
        session.execute(insert(AuthFailure), failures)

    def ages() -> tuple[list[str], list[tuple[str, bool]]]:
        with db.session() as session:
            kept = session.scalars(select(Event.details).where(Event.message.like("m%"))).all()
            fails = session.execute(select(AuthFailure.scope, AuthFailure.ts)).all()
        return sorted(d["age"] for d in kept), sorted(
            (scope, now - ts.replace(tzinfo=now.tzinfo) < timedelta(seconds=600))
            for scope, ts in fails
        )

    async def pruned() -> Any:
        kept, fails = await asyncio.to_thread(ages)
        return (kept, fails) if "old" not in kept and len(fails) == 2 else None

    kept, fails = await wait_for(pruned, timeout=5, interval=0.1)
    assert kept == ["young", "young"]
    assert fails == [("hub", False), ("vm:1", True)]  # the Hub's failures are the Hub's
    assert twarga.services.syslog.pruned_events >= 3


class GuestChannel:
    """The host end of a VM's syslog channel as QEMU offers it: a listening UNIX socket."""

    def __init__(self, server: asyncio.Server, connected: asyncio.Future[Any]) -> None:
        self.server = server
        self.connected = connected
        self.writer: asyncio.StreamWriter | None = None

    @classmethod
    async def open(cls, twarga: Any, vm: dict[str, Any], path: Path) -> GuestChannel:
        loop = asyncio.get_running_loop()
        connected: asyncio.Future[Any] = loop.create_future()

        def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not connected.done():
                connected.set_result(writer)

        server = await asyncio.start_unix_server(accept, str(path))
        channels = twarga.services.syslog.channels
        # The test driver has no QEMU to create the socket: point the reader at ours.
        channels._resolve = lambda domain: (vm["id"], str(path)) if domain == vm["domain"] else None
        channels.attach(vm["domain"])
        channel = cls(server, connected)
        channel.writer = await asyncio.wait_for(connected, timeout=5)
        return channel

    def write(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.server.close()
