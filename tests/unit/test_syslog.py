"""Pieces of the syslog receiver that need no server: addresses, line splitting and the
per-guest budget that keeps a flooding guest from flooding the database."""

from __future__ import annotations

import pytest

from twarga_lab.services.sshlog import MAX_LINE
from twarga_lab.services.syslog import LineBudget, parse_address, split_lines


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
    fed: list[bytes] = []
    budget = LineBudget(fed.append, "twarga-1-noisy", rate=10, burst=100)
    for _ in range(10_000):
        budget(b"line")
    assert 100 <= len(fed) < 200  # the burst, plus what the rate refilled meanwhile
    assert budget.dropped == 10_000 - len(fed)
