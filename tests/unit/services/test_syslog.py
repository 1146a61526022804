"""Pieces of the syslog receiver that need no server: addresses, line splitting, the
per-source budgets and queues that keep a flooding source from flooding the database or
starving the others, and which senders may speak for a VM."""

from __future__ import annotations

import pytest

from twarga_lab.services.syslog import (
    Origin,
    SyslogIngest,
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
