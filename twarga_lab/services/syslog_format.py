"""Syslog lines split into host, program, pid and message: the wire formats the receiver reads.

:func:`parse_syslog` reads RFC 5424 (``<PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG``),
RFC 3164 (``<PRI>Mmm dd hh:mm:ss HOST TAG[PID]: MSG``, host optional as busybox ``syslogd -R``
omits it), busybox's local file format (``Mmm dd hh:mm:ss HOST facility.level TAG[PID]: MSG``,
what the tiny image writes into its syslog channel) and auth.log files (classic or ISO 8601
timestamps). A pure function of the text (no I/O); what the message means is for the parser
of the program that wrote it (:mod:`twarga_lab.services.sshlog` for SSH servers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MAX_LINE", "SyslogRecord", "parse_syslog"]

MAX_LINE = 8192


@dataclass(frozen=True, slots=True)
class SyslogRecord:
    """One syslog message: where it claims to come from and what it says."""

    hostname: str | None
    app: str | None
    pid: int | None
    message: str
    timestamp: str | None = None
    priority: int | None = None
    structured_data: str | None = None  # RFC 5424 SD elements, verbatim


_RFC5424 = re.compile(
    r"1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<pid>\S+) \S+ "
    r"(?P<sd>-|(?:\[(?:[^\]\\\"]|\\.|\"(?:[^\"\\]|\\.)*\")*\])+)(?: (?P<msg>.*))?$",
    re.DOTALL,
)
# Classic timestamp or ISO 8601; then an optional host, an optional busybox
# ``facility.level`` and the tag with an optional pid.
_BSD = re.compile(
    r"(?P<ts>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S*) "
    r"(?:(?P<host>[^\s:\[\]]+) )?(?:[a-z0-9]+\.[a-z]+ )?"
    r"(?P<app>[^\s:\[\]]+)(?:\[(?P<pid>\d+)\])?: ?(?P<msg>.*)$",
    re.DOTALL,
)


def parse_syslog(line: str | bytes) -> SyslogRecord | None:
    """Split one syslog line (any format above); None if it is not syslog at all."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    line = line[:MAX_LINE].rstrip("\r\n\x00")
    priority = None
    if line.startswith("<"):
        end = line.find(">", 1, 5)
        if end < 0 or not line[1:end].isdigit():
            return None
        priority = int(line[1:end])
        line = line[end + 1 :]
        if line.startswith("1 "):
            m = _RFC5424.match(line)
            if m is None:
                return None
            msg = m["msg"] or ""
            if msg.startswith("\ufeff"):
                msg = msg[1:]
            pid = m["pid"]
            return SyslogRecord(
                hostname=None if m["host"] == "-" else m["host"],
                app=None if m["app"] == "-" else m["app"],
                pid=int(pid) if pid.isdigit() else None,
                message=msg,
                timestamp=None if m["ts"] == "-" else m["ts"],
                priority=priority,
                structured_data=None if m["sd"] == "-" else m["sd"],
            )
    m = _BSD.match(line)
    if m is None:
        return None
    pid = m["pid"]
    return SyslogRecord(
        hostname=m["host"],
        app=m["app"],
        pid=int(pid) if pid else None,
        message=m["msg"],
        timestamp=m["ts"],
        priority=priority,
    )
