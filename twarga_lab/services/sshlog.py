"""Syslog lines of SSH servers (OpenSSH ``sshd`` and ``dropbear``) as authentication events.

Two steps, both pure functions of the text (no I/O):

* :func:`parse_syslog` splits a line into host, program, pid and message. It reads RFC 5424
  (``<PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG``), RFC 3164 (``<PRI>Mmm dd hh:mm:ss HOST
  TAG[PID]: MSG``, host optional as busybox ``syslogd -R`` omits it), busybox's local file
  format (``Mmm dd hh:mm:ss HOST facility.level TAG[PID]: MSG``, what the tiny image writes
  into its syslog channel) and auth.log files (classic or ISO 8601 timestamps).
* :class:`SshLogParser` turns the message of an SSH server into an :class:`SshEvent`.
  dropbear names the client only in some lines ("Login attempt for nonexistent user" has no
  address), so the parser remembers each dropbear process's client from its
  "Child connection from" line.

What counts towards brute force is one failure per rejected credential: sshd's ``Failed
<method>`` (publickey only for unknown users, as fail2ban's default), dropbear's ``Bad
password attempt``, ``Too-long password attempt``, ``Pubkey auth bad signature`` and
``Login attempt for nonexistent user`` (logged once per connection). sshd's ``Invalid user``
line is an event but not a count: the ``Failed password for invalid user`` that follows for
each password tried is.

User names come from the network: every pattern takes the client address from the end of
the line, which the server writes after the name, so a name like ``x from 6.6.6.6`` cannot
choose the address.
"""

from __future__ import annotations

import enum
import re
from collections import OrderedDict
from dataclasses import dataclass

__all__ = [
    "SshEvent",
    "SshEventKind",
    "SshLogParser",
    "SyslogRecord",
    "parse_syslog",
]

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


class SshEventKind(enum.StrEnum):
    accepted = "accepted"  # a successful login
    failed = "failed"  # a rejected password (or key of an unknown user)
    invalid_user = "invalid_user"  # a user name the server does not know
    max_attempts = "max_attempts"  # the server gave up on a client
    preauth_disconnect = "preauth_disconnect"  # a connection closed before login
    session_closed = "session_closed"  # a logged-in session ended
    connection = "connection"  # a new connection (tracked, not an event)


@dataclass(frozen=True, slots=True)
class SshEvent:
    """What one SSH server line means."""

    kind: SshEventKind
    server: str  # sshd or dropbear
    source: str | None
    port: int | None = None
    user: str | None = None
    method: str | None = None
    counts: bool = False  # one more failure towards brute force
    fails: int | None = None  # dropbear's count of failures in the connection
    reason: str | None = None
    key: str | None = None  # the key's fingerprint for public-key logins
    hostname: str | None = None
    pid: int | None = None

    @property
    def severity(self) -> str:
        """``info`` for logins and disconnects, ``warning`` for failures."""
        if self.kind in (
            SshEventKind.failed,
            SshEventKind.invalid_user,
            SshEventKind.max_attempts,
        ):
            return "warning"
        return "info"


_IP = r"(?P<ip>[0-9A-Fa-f:.]+)"
_SSHD_PORT = _IP + r" port (?P<port>\d+)"
# sshd: "Accepted password for root from 192.0.2.1 port 50000 ssh2[: ED25519 SHA256:...]"
_SSHD_ACCEPTED = re.compile(
    r"Accepted (?P<method>[\w/-]+) for (?P<user>.*) from "
    + _SSHD_PORT
    + r"(?: ssh2)?(?:: (?P<key>.*))?$"
)
_SSHD_FAILED = re.compile(
    r"Failed (?P<method>[\w/-]+) for (?P<invalid>invalid user )?(?P<user>.*) from "
    + _SSHD_PORT
    + r"(?: ssh2)?(?:: .*)?$"
)
_SSHD_INVALID = re.compile(r"[Ii]nvalid user (?P<user>.*) from " + _SSHD_PORT + r"\s*$")
_SSHD_MAX = re.compile(
    r"(?:error: )?maximum authentication attempts exceeded for (?:invalid user )?"
    r"(?P<user>.*) from " + _SSHD_PORT + r"(?: ssh2)?(?: \[preauth\])?$"
)
_SSHD_CLOSED = re.compile(
    r"(?:Connection (?:closed|reset) by|Disconnected from)"
    r"(?: (?:(?:invalid|authenticating) )?user (?P<user>.*))? "
    + _SSHD_PORT
    + r"(?P<pre> \[preauth\])?$"
)
_SSHD_RECEIVED = re.compile(
    r"Received disconnect from " + _SSHD_PORT + r":\s*\d+: (?P<reason>.*?)(?P<pre> \[preauth\])?$"
)
_SSHD_CONNECTION = re.compile(r"Connection from " + _SSHD_PORT + r"(?: on .*)?$")
# dropbear (2022.83): client addresses are "ip:port", IPv6 ones too.
_DB_ADDR = r"(?P<addr>\S+)"
_DB_BAD = re.compile(
    r"(?P<what>Bad|Too-long) password attempt for '(?P<user>.*)' from " + _DB_ADDR + "$"
)
_DB_PASSWORD_OK = re.compile(
    r"(?:Password auth succeeded|Auth succeeded with blank password) for '(?P<user>.*)' from "
    + _DB_ADDR
    + r"(?:, extra auth required)?$"
)
_DB_PUBKEY_OK = re.compile(
    r"Pubkey auth succeeded for '(?P<user>.*)' with (?P<type>\S+) key (?P<key>\S+) from "
    + _DB_ADDR
    + r"(?:, extra auth required)?$"
)
_DB_PUBKEY_BAD = re.compile(
    r"Pubkey auth bad signature for '(?P<user>.*)' with key (?P<key>\S+) from " + _DB_ADDR + "$"
)
_DB_EXIT_BEFORE = re.compile(
    r"Exit before auth(?: from <(?P<addr>[^>]*)>)?: "
    r"(?:\(user '(?P<user>.*)', (?P<fails>\d+) fails\): )?(?P<reason>.*)$"
)
_DB_EXIT = re.compile(r"Exit \((?P<user>.*)\)(?: from <(?P<addr>[^>]*)>)?: (?P<reason>.*)$")
_DB_CHILD = re.compile(r"Child connection from " + _DB_ADDR + "$")
_DB_MAX = re.compile(r"Max auth tries reached - user '(?P<user>.*)'$")


def _split_addr(addr: str | None) -> tuple[str | None, int | None]:
    """``10.0.2.2:5000`` or ``[::1]:5000`` or ``::1:5000`` -> (ip, port)."""
    if not addr:
        return None, None
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        return addr.strip("[]") or None, None
    return host.strip("[]") or None, int(port)


class SshLogParser:
    """Classifies SSH server lines; remembers dropbear processes' clients.

    Keep one parser per log stream (a VM's channel, or one host on the network receiver):
    dropbear pids are only meaningful within one machine.
    """

    def __init__(self, max_tracked: int = 4096) -> None:
        self._clients: OrderedDict[tuple[str | None, int], tuple[str | None, int | None]] = (
            OrderedDict()
        )
        self._max_tracked = max_tracked

    def parse_line(self, line: str | bytes) -> SshEvent | None:
        """:func:`parse_syslog` then :meth:`classify`."""
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        if "sshd" not in line and "dropbear" not in line:
            return None  # most of a syslog stream: skip the regular expressions
        record = parse_syslog(line)
        return self.classify(record) if record is not None else None

    def classify(self, record: SyslogRecord) -> SshEvent | None:
        """The SSH event in ``record``, or None for anything else."""
        app = record.app
        if app is None:
            return None
        if app == "dropbear":
            return self._dropbear(record)
        if app.startswith("sshd"):  # sshd, and sshd-session of OpenSSH 9.8+
            return self._sshd(record)
        return None

    # -- sshd ---------------------------------------------------------------------------

    def _sshd(self, r: SyslogRecord) -> SshEvent | None:
        msg = r.message
        first = msg[:4]
        if first == "Fail":
            m = _SSHD_FAILED.match(msg)
            if m is None:
                return None
            method = m["method"]
            invalid = m["invalid"] is not None
            return SshEvent(
                SshEventKind.failed, "sshd", m["ip"], int(m["port"]), m["user"], method,
                counts=method not in ("publickey", "none") or invalid,
                hostname=r.hostname, pid=r.pid,
            )  # fmt: skip
        if first == "Acce":
            m = _SSHD_ACCEPTED.match(msg)
            if m is None:
                return None
            return SshEvent(
                SshEventKind.accepted, "sshd", m["ip"], int(m["port"]), m["user"], m["method"],
                key=m["key"], hostname=r.hostname, pid=r.pid,
            )  # fmt: skip
        if first in ("Inva", "inva"):
            m = _SSHD_INVALID.match(msg)
            if m is None:
                return None
            return SshEvent(
                SshEventKind.invalid_user, "sshd", m["ip"], int(m["port"]), m["user"],
                hostname=r.hostname, pid=r.pid,
            )  # fmt: skip
        if first in ("Conn", "Disc"):
            m = _SSHD_CLOSED.match(msg)
            if m is not None:
                kind = SshEventKind.preauth_disconnect if m["pre"] else SshEventKind.session_closed
                return SshEvent(
                    kind, "sshd", m["ip"], int(m["port"]), m["user"],
                    hostname=r.hostname, pid=r.pid,
                )  # fmt: skip
            m = _SSHD_CONNECTION.match(msg)
            if m is not None:
                return SshEvent(
                    SshEventKind.connection, "sshd", m["ip"], int(m["port"]),
                    hostname=r.hostname, pid=r.pid,
                )  # fmt: skip
            if msg.startswith("Disconnecting: Too many authentication failures"):
                return SshEvent(
                    SshEventKind.max_attempts, "sshd", None, hostname=r.hostname, pid=r.pid
                )
            return None
        if first == "Rece":
            m = _SSHD_RECEIVED.match(msg)
            if m is None:
                return None
            kind = SshEventKind.preauth_disconnect if m["pre"] else SshEventKind.session_closed
            return SshEvent(
                kind, "sshd", m["ip"], int(m["port"]), reason=m["reason"],
                hostname=r.hostname, pid=r.pid,
            )  # fmt: skip
        if "maximum authentication attempts" in msg:
            m = _SSHD_MAX.match(msg)
            if m is None:
                return None
            return SshEvent(
                SshEventKind.max_attempts, "sshd", m["ip"], int(m["port"]), m["user"],
                hostname=r.hostname, pid=r.pid,
            )  # fmt: skip
        return None

    # -- dropbear -------------------------------------------------------------------------

    def _remember(self, r: SyslogRecord, ip: str | None, port: int | None) -> None:
        if r.pid is None:
            return
        key = (r.hostname, r.pid)
        self._clients[key] = (ip, port)
        self._clients.move_to_end(key)
        while len(self._clients) > self._max_tracked:
            self._clients.popitem(last=False)

    def _client_of(self, r: SyslogRecord) -> tuple[str | None, int | None]:
        if r.pid is None:
            return None, None
        return self._clients.get((r.hostname, r.pid), (None, None))

    def _dropbear(self, r: SyslogRecord) -> SshEvent | None:
        msg = r.message
        first = msg[:4]
        if first in ("Bad ", "Too-"):
            m = _DB_BAD.match(msg)
            if m is None:
                return None
            ip, port = _split_addr(m["addr"])
            reason = "password too long" if m["what"] == "Too-long" else None
            return SshEvent(
                SshEventKind.failed, "dropbear", ip, port, m["user"], "password",
                counts=True, reason=reason, hostname=r.hostname, pid=r.pid,
            )  # fmt: skip
        if first == "Chil":
            m = _DB_CHILD.match(msg)
            if m is None:
                return None
            ip, port = _split_addr(m["addr"])
            self._remember(r, ip, port)
            return SshEvent(
                SshEventKind.connection, "dropbear", ip, port, hostname=r.hostname, pid=r.pid
            )
        if first == "Logi":
            if not msg.startswith("Login attempt for nonexistent user"):
                return None
            ip, port = self._client_of(r)
            return SshEvent(
                SshEventKind.invalid_user, "dropbear", ip, port, counts=True,
                hostname=r.hostname, pid=r.pid,
            )  # fmt: skip
        if first in ("Pass", "Auth"):
            m = _DB_PASSWORD_OK.match(msg)
            if m is None:
                return None
            ip, port = _split_addr(m["addr"])
            return SshEvent(
                SshEventKind.accepted, "dropbear", ip, port, m["user"], "password",
                hostname=r.hostname, pid=r.pid,
            )  # fmt: skip
        if first == "Pubk":
            m = _DB_PUBKEY_OK.match(msg)
            if m is not None:
                ip, port = _split_addr(m["addr"])
                return SshEvent(
                    SshEventKind.accepted, "dropbear", ip, port, m["user"], "publickey",
                    key=f"{m['type']} {m['key']}", hostname=r.hostname, pid=r.pid,
                )  # fmt: skip
            m = _DB_PUBKEY_BAD.match(msg)
            if m is None:
                return None
            ip, port = _split_addr(m["addr"])
            return SshEvent(
                SshEventKind.failed, "dropbear", ip, port, m["user"], "publickey",
                counts=True, reason="bad signature", key=m["key"],
                hostname=r.hostname, pid=r.pid,
            )  # fmt: skip
        if first == "Exit":
            m = _DB_EXIT_BEFORE.match(msg)
            if m is not None:
                ip, port = _split_addr(m["addr"])
                if ip is None:
                    ip, port = self._client_of(r)
                return SshEvent(
                    SshEventKind.preauth_disconnect, "dropbear", ip, port, m["user"],
                    fails=int(m["fails"]) if m["fails"] else None, reason=m["reason"],
                    hostname=r.hostname, pid=r.pid,
                )  # fmt: skip
            m = _DB_EXIT.match(msg)
            if m is None:
                return None
            ip, port = _split_addr(m["addr"])
            if ip is None:
                ip, port = self._client_of(r)
            return SshEvent(
                SshEventKind.session_closed, "dropbear", ip, port, m["user"],
                reason=m["reason"], hostname=r.hostname, pid=r.pid,
            )  # fmt: skip
        if first == "Max ":
            m = _DB_MAX.match(msg)
            if m is None:
                return None
            ip, port = self._client_of(r)
            return SshEvent(
                SshEventKind.max_attempts, "dropbear", ip, port, m["user"],
                hostname=r.hostname, pid=r.pid,
            )  # fmt: skip
        return None
