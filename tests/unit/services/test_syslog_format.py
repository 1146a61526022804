"""Syslog lines split into host, program, pid and message, in every format the receiver
reads; anything else is not syslog."""

from __future__ import annotations

import pytest

from twarga_lab.services.syslog_format import MAX_LINE, SyslogRecord, parse_syslog


def test_rfc5424_with_structured_data_and_a_bom():
    line = (
        '<38>1 2026-03-01T12:00:00.123Z web sshd 412 - [origin ip="10.0.0.5"][x@1 a="b\\"c"] '
        "\ufeffFailed password for root from 10.0.0.9 port 4242 ssh2"
    )
    assert parse_syslog(line) == SyslogRecord(
        hostname="web",
        app="sshd",
        pid=412,
        message="Failed password for root from 10.0.0.9 port 4242 ssh2",
        timestamp="2026-03-01T12:00:00.123Z",
        priority=38,
        structured_data='[origin ip="10.0.0.5"][x@1 a="b\\"c"]',
    )


def test_rfc5424_nil_values_become_none():
    record = parse_syslog(b"<13>1 - - - - - -")
    assert record == SyslogRecord(None, None, None, "", None, 13, None)
    assert parse_syslog("<13>1 - host app notapid - - hi").pid is None


def test_rfc3164_with_and_without_a_host():
    assert parse_syslog("<86>Mar  1 12:00:00 web sshd[99]: Accepted publickey") == SyslogRecord(
        "web", "sshd", 99, "Accepted publickey", "Mar  1 12:00:00", 86
    )
    # busybox syslogd -R leaves the host out.
    assert parse_syslog("<86>Mar 11 12:00:00 sshd[7]: Connection closed") == SyslogRecord(
        None, "sshd", 7, "Connection closed", "Mar 11 12:00:00", 86
    )


def test_busybox_file_lines_and_iso_auth_log_lines():
    busybox = parse_syslog("Mar  1 12:00:00 tiny auth.info dropbear[120]: Password auth succeeded")
    assert busybox == SyslogRecord(
        "tiny", "dropbear", 120, "Password auth succeeded", "Mar  1 12:00:00", None
    )
    iso = parse_syslog("2026-03-01T12:00:00.5+00:00 deb sshd: Server listening on 0.0.0.0\r\n\x00")
    assert iso == SyslogRecord(
        "deb", "sshd", None, "Server listening on 0.0.0.0", "2026-03-01T12:00:00.5+00:00", None
    )


@pytest.mark.parametrize(
    "line",
    [
        "",
        "hello world",
        "<abc>Mar  1 12:00:00 web sshd: x",
        "<123456>Mar  1 12:00:00 web sshd: x",
        "<13>1 not a valid 5424",
        "Mar  1 12:00 web sshd: no seconds",
    ],
)
def test_what_is_not_syslog_is_none(line):
    assert parse_syslog(line) is None


def test_invalid_utf8_is_replaced_and_long_lines_are_cut():
    record = parse_syslog(b"<13>Mar  1 12:00:00 web app: caf\xe9")
    assert record is not None and record.message == "caf\ufffd"
    long = "<13>Mar  1 12:00:00 web app: " + "x" * (2 * MAX_LINE)
    record = parse_syslog(long)
    assert record is not None
    assert len(record.message) == MAX_LINE - len("<13>Mar  1 12:00:00 web app: ")
