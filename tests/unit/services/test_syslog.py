"""Pieces of the syslog receiver that need no server: addresses, line splitting, the
per-source budgets and queues that keep a flooding source from flooding the database or
starving the others, and which senders may speak for a VM; then the ingest's consumer
recording into a real SOC service on SQLite."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from twarga_lab.db import Database
from twarga_lab.db.models import VM, Event, User, VMStatus
from twarga_lab.services.soc import SocService
from twarga_lab.services.syslog import (
    Origin,
    SyslogIngest,
    TokenBucket,
    TrustedSources,
    parse_address,
    split_lines,
)
from twarga_lab.services.syslog_format import MAX_LINE, SyslogRecord, parse_syslog


@pytest.mark.parametrize(
    ("address", "parsed"),
    [("127.0.0.1:5514", ("127.0.0.1", 5514)), ("[::1]:514", ("::1", 514)), ("", None)],
)
def test_addresses(address, parsed):
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", ["localhost:5514", "127.0.0.1", "127.0.0.1:70000", "x:y"])
def test_bad_addresses(address):
    with pytest.raises(ValueError):
        parse_address(address)


def test_lines_are_split_across_reads_and_cut_when_too_long():
    seen: list[bytes] = []
    buffer = bytearray(b"first\r\nsec")
    split_lines(buffer, seen.append)
    assert seen == [b"first"] and buffer == b"sec"
    buffer += b"ond\n\n"
    split_lines(buffer, seen.append)
    assert seen == [b"first", b"second"] and buffer == b""
    buffer += b"x" * (MAX_LINE + 10)
    split_lines(buffer, seen.append)
    assert seen[-1] == b"x" * MAX_LINE and buffer == b""


def test_a_flooding_guest_is_cut_to_its_budget():
    soc = FakeSoc()
    ingest = SyslogIngest(soc, queue_size=100_000, guest_rate=10, guest_burst=100)  # type: ignore[arg-type]
    guest = Origin("virtio", vm_id=1)
    for _ in range(10_000):
        ingest.feed(guest, b"line")
    queued = ingest.queued
    assert 100 <= queued < 200  # the burst, plus what the rate refilled meanwhile
    assert ingest.dropped["virtio"] == 10_000 - queued
    # One flood notice for the burst, however many lines were dropped.
    assert [(n.channel, n.vm_id) for n in ingest._notices] == [("virtio", 1)]


class FakeSoc:
    def record_ssh(self, observations: list) -> int:
        return len(observations)

    def record_floods(self, notices: list) -> int:
        return len(notices)


def test_sources_are_drained_in_turn_so_a_flood_cannot_starve_a_channel():
    ingest = SyslogIngest(FakeSoc(), queue_size=1000, batch=50, rate=1e9, burst=1e9)  # type: ignore[arg-type]
    flooder = Origin("udp", peer="127.0.0.1")
    for i in range(5000):
        ingest.feed(flooder, b"flood %d" % i)
    ingest.feed(Origin("virtio", vm_id=7), b"from the guest")
    ingest.feed(Origin("tcp", peer="127.0.0.2"), b"from another sender")
    assert ingest.dropped["network"] == 4000  # beyond the flooder's own queue
    first = ingest._take()
    assert len(first) == 50
    assert (Origin("virtio", vm_id=7), b"from the guest") in first
    assert (Origin("tcp", peer="127.0.0.2"), b"from another sender") in first


def test_trusted_sources_by_address_or_secret():
    trust = TrustedSources(
        {
            "twarga-1-a": ["192.0.2.10", "secret:" + "a" * 20],
            "twarga-2-b": ["10.1.0.0/24"],
            "twarga-3-c": ["10.1.0.0/24"],
        }
    )

    def rec(host: str | None, sd: str | None = None) -> SyslogRecord:
        return SyslogRecord(hostname=host, app="sshd", pid=1, message="", structured_data=sd)

    assert trust.attribute("192.0.2.10", rec("twarga-2-b")) == "twarga-1-a"  # the address
    assert trust.attribute("10.1.0.5", rec("twarga-3-c")) == "twarga-3-c"
    assert trust.attribute("10.1.0.5", rec("twarga-1-a")) is None  # not trusted for that one
    assert trust.attribute("127.0.0.1", rec("twarga-1-a")) is None
    good = '[twarga@32473 secret="' + "a" * 20 + '"]'
    bad = '[twarga@32473 secret="' + "b" * 20 + '"]'
    assert trust.attribute("127.0.0.1", rec("x", good)) == "twarga-1-a"
    assert trust.attribute("127.0.0.1", rec("twarga-1-a", bad)) is None
    line = (
        f"<38>1 2026-11-27T08:00:01Z x sshd 4 - {good} Failed password for root from 1.2.3.4 port 5"
    )
    record = parse_syslog(line)
    assert record is not None and record.structured_data == good
    assert trust.attribute("127.0.0.1", record) == "twarga-1-a"
    assert not TrustedSources({})


@pytest.mark.parametrize(
    "mapping",
    [{"d": ["not-an-address"]}, {"d": ["secret:short"]}, {"d": [5]},
     {"a": ["secret:" + "x" * 16], "b": ["secret:" + "x" * 16]}],
)  # fmt: skip
def test_bad_trusted_sources_are_refused(mapping):
    from traitlets import TraitError

    from twarga_lab.app import TwargaLabApp

    with pytest.raises(ValueError):
        TrustedSources(mapping)
    with pytest.raises(TraitError):
        TwargaLabApp(syslog_trusted_sources=mapping)


def test_network_senders_changing_addresses_share_one_bounded_allowance():
    ingest = SyslogIngest(FakeSoc(), queue_size=10, batch=1000, rate=1e9, burst=1e9)  # type: ignore[arg-type]
    for n in range(5000):  # every line from a new loopback address
        ingest.feed(Origin("udp", peer=f"127.0.{n // 250}.{n % 250 + 1}"), b"x")
    assert ingest.queued == ingest.network_limit == 100
    assert ingest.dropped["network"] == 4900
    assert len(ingest._notices) == 10  # warning events: ten, then one a minute
    guest = Origin("virtio", vm_id=3)
    ingest.feed(guest, b"still heard")
    assert (guest, b"still heard") in ingest._take()


def test_a_token_bucket_gives_its_burst_then_its_rate():
    bucket = TokenBucket(rate=2.0, burst=3.0)
    start = bucket.stamp
    assert [bucket.take(start) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(start + 0.25) is False  # half a token
    assert bucket.take(start + 0.5) is True
    assert [bucket.take(start + 100) for _ in range(4)] == [True, True, True, False]  # capped


def test_a_full_queue_drops_and_lines_leave_in_order():
    ingest = SyslogIngest(FakeSoc(), queue_size=3, rate=1e9, burst=1e9)  # type: ignore[arg-type]
    sender = Origin("udp", peer="127.0.0.9")
    for i in range(5):
        ingest.feed(sender, b"line %d" % i)
    assert ingest.queued == 3 and ingest.dropped == {"virtio": 0, "network": 2}
    assert [line for _, line in ingest._take()] == [b"line 0", b"line 1", b"line 2"]
    assert ingest.queued == 0 and ingest._take() == []
    ingest.feed(sender, b"line 5")  # room again
    assert [line for _, line in ingest._take()] == [b"line 5"]


def test_a_flood_that_calms_down_and_starts_again_is_a_second_notice():
    ingest = SyslogIngest(FakeSoc(), guest_rate=1e-9, guest_burst=1, flood_quiet=10.0)  # type: ignore[arg-type]
    guest = Origin("virtio", vm_id=4)
    for _ in range(50):
        ingest.feed(guest, b"x")
    assert ingest.floods == 1 and len(ingest._notices) == 1
    ingest._end_quiet_bursts(time.monotonic() + 5)  # still within the quiet time
    ingest.feed(guest, b"x")
    assert ingest.floods == 1
    ingest._end_quiet_bursts(time.monotonic() + 11)
    ingest.feed(guest, b"x")
    assert ingest.floods == 2 and [n.vm_id for n in ingest._notices] == [4, 4]
    assert ingest.dropped["virtio"] == 51


def test_idle_network_senders_are_forgotten_but_guests_are_not():
    ingest = SyslogIngest(FakeSoc())  # type: ignore[arg-type]
    ingest.feed(Origin("udp", peer="127.0.0.5"), b"x")
    ingest.feed(Origin("virtio", vm_id=2), b"x")
    ingest._take()
    ingest._end_quiet_bursts(time.monotonic() + 61)
    assert list(ingest._sources) == [("virtio", 2)]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'syslog.db'}").open()
    yield database
    database.dispose()


def add_vm(db: Database) -> int:
    with db.session() as session:
        alice = User(name="alice")
        session.add(alice)
        session.flush()
        vm = VM(
            owner_id=alice.id, name="web", domain_name="twarga-1-web", image="twarga/tiny",
            os_type="linux", ram_mb=256, cpu=1, disk_gb=1, status=VMStatus.running,
        )  # fmt: skip
        session.add(vm)
        session.flush()
        return vm.id


def events(db: Database) -> list[Event]:
    with db.session() as session:
        return list(session.scalars(select(Event).order_by(Event.id)))


FAILED = b"<38>Mar  1 12:00:00 web sshd[%d]: Failed password for root from 203.0.113.5 port %d ssh2"


async def test_the_consumer_records_guest_ssh_lines_and_flood_notices(db):
    vm_id = add_vm(db)
    ingest = SyslogIngest(SocService(db), guest_rate=1e-9, guest_burst=3)
    ingest.start()
    guest = Origin("virtio", vm_id=vm_id)
    ingest.feed(guest, b"<30>Mar  1 12:00:00 web kernel: not ssh")
    ingest.feed(guest, FAILED % (10, 40001))
    ingest.feed(guest, FAILED % (11, 40002))
    ingest.feed(guest, FAILED % (12, 40003))  # over the burst: dropped, one notice
    deadline = time.monotonic() + 10
    while ingest.recorded < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await ingest.stop()
    recorded = events(db)
    assert ingest.recorded == 3
    assert sorted(e.details["action"] for e in recorded) == [
        "ssh_failed",
        "ssh_failed",
        "syslog_flood",
    ]
    failed = [e for e in recorded if e.details["action"] == "ssh_failed"]
    assert {(e.vm_id, e.user_name, e.source) for e in failed} == {(vm_id, "alice", "203.0.113.5")}
    assert [e.details["client_port"] for e in failed] == [40001, 40002]


async def test_stopping_records_what_is_queued(db):
    vm_id = add_vm(db)
    ingest = SyslogIngest(SocService(db))
    for i in range(3):
        ingest.feed(Origin("virtio", vm_id=vm_id), FAILED % (20 + i, 41000 + i))
    ingest.start()
    await ingest.stop()
    assert ingest.queued == 0 and len(events(db)) == 3


async def test_untrusted_network_ssh_lines_are_rate_limited_system_events(db):
    add_vm(db)
    ingest = SyslogIngest(SocService(db), unattributed_rate=1e-9, unattributed_burst=2)
    for i in range(5):
        ingest.feed(Origin("udp", peer="127.0.0.7"), FAILED % (30 + i, 42000 + i))
    ingest.start()
    await ingest.stop()
    recorded = events(db)
    assert [(e.type, e.details["action"]) for e in recorded] == [
        ("system", "syslog_unattributed"),
        ("system", "syslog_unattributed"),
    ]
    assert all(e.vm_id is None for e in recorded)
    assert ingest.unattributed_dropped == 3
