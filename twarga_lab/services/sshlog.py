"""Syslog lines of SSH servers (OpenSSH ``sshd`` and ``dropbear``) as authentication events.

:class:`SshLogParser` turns the message of an SSH server (split from its syslog line by
:func:`~twarga_lab.services.syslog_format.parse_syslog`) into an :class:`SshEvent`, by walking
:data:`RULES` in order, in the way of fail2ban's ``filter.d/sshd.conf`` and ``dropbear.conf``:
each row is ``(daemon, pattern, kind)`` plus what the line does not say itself (whether it
counts towards brute force, the method or reason a daemon implies). A pattern is matched at
the start of the message and names what it reads with the groups ``user``, ``source``,
``port``, ``method``, ``key`` (``key_type``), ``reason`` and ``fails``; the first row that
matches wins, and the rows of one daemon are written so that no line matches two of them.
Teaching the parser another daemon, or another version's wording, is adding rows.

dropbear names the client only in some lines ("Login attempt for nonexistent user" has no
address), so the parser remembers each dropbear process's client from its "Child connection
from" line (rows with ``remember``) and rows with ``recall`` take it from there when the line
names none.

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
from dataclasses import dataclass, field

from twarga_lab.services.syslog_format import SyslogRecord, parse_syslog

__all__ = [
    "RULES",
    "Rule",
    "SshEvent",
    "SshEventKind",
    "SshLogParser",
]


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


@dataclass(frozen=True, slots=True)
class Rule:
    """A row of :data:`RULES`: a message of ``daemon`` matching ``pattern`` is a ``kind`` event."""

    daemon: str  # the event's ``server``: sshd or dropbear
    pattern: str  # matched at the start of the message (re.match)
    kind: SshEventKind
    counts: bool = False  # one more failure towards brute force
    method: str | None = None  # when the pattern has no ``method`` group
    reason: str | None = None  # when the pattern has no ``reason`` group
    remember: bool = False  # a connection line: remember the process's client
    recall: bool = False  # no client in the line: take the process's remembered one
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))


K = SshEventKind
# sshd (OpenSSH 9.x, e.g. 9.2 of Debian 12): "... from 192.0.2.1 port 50000".
_FROM = r"(?P<source>[0-9A-Fa-f:.]+) port (?P<port>\d+)"
_FROM_ANY = r"[0-9A-Fa-f:.]+ port \d+"  # the same without groups, for a lookahead
_FAILED_END = r"(?: ssh2)?(?:: .*)?$"  # "ssh2: RSA SHA256:..." after a failed key
# dropbear (2022.83): the client as "ip:port", IPv6 ones too ("[::1]:22" or "::1:22"): the
# port is the digits after the last colon, brackets around the address are dropped.
_ADDR = r"[\[\]]*(?P<source>\S*?)[\[\]]*(?::(?P<port>\d+))?(?<=\S)"  # after "from "
_ADDR_IN = r"[\[\]]*(?P<source>[^>]*?)[\[\]]*(?::(?P<port>\d+))?"  # inside "<...>"

RULES: tuple[Rule, ...] = (
    # -- sshd -----------------------------------------------------------------------------
    Rule("sshd",
         r"Failed (?P<method>(?!(?:publickey|none) )[\w/-]+) for (?:invalid user )?"
         rf"(?P<user>.*) from {_FROM}{_FAILED_END}",
         K.failed, counts=True),
    # A key of an unknown user counts; a known user's client trying its keys in turn does not.
    Rule("sshd",
         rf"Failed (?P<method>publickey|none) for invalid user (?P<user>.*) from {_FROM}"
         + _FAILED_END,
         K.failed, counts=True),
    Rule("sshd",
         r"Failed (?P<method>publickey|none) for "
         rf"(?!invalid user .* from {_FROM_ANY}{_FAILED_END})(?P<user>.*) from {_FROM}"
         + _FAILED_END,
         K.failed),
    Rule("sshd",
         rf"Accepted (?P<method>[\w/-]+) for (?P<user>.*) from {_FROM}(?: ssh2)?"
         r"(?:: (?P<key>.*))?$",
         K.accepted),
    Rule("sshd", rf"[Ii]nvalid user (?P<user>.*) from {_FROM}\s*$", K.invalid_user),
    Rule("sshd",
         r"(?:error: )?maximum authentication attempts exceeded for (?:invalid user )?"
         rf"(?P<user>.*) from {_FROM}(?: ssh2)?(?: \[preauth\])?$",
         K.max_attempts),
    Rule("sshd", r"Disconnecting: Too many authentication failures", K.max_attempts),
    # OpenSSH 9.x names who and where: "Disconnecting authenticating user twarga 10.0.2.2
    # port 43216: Too many authentication failures [preauth]" (MaxAuthTries keys or passwords).
    Rule("sshd",
         r"Disconnecting (?:(?:invalid|authenticating) )?user (?P<user>.*) "
         rf"{_FROM}: (?P<reason>Too many authentication failures)(?: \[preauth\])?$",
         K.max_attempts),
    Rule("sshd",
         r"Disconnecting (?:(?:invalid|authenticating) )?user (?P<user>.*) "
         rf"{_FROM}: (?P<reason>(?!Too many authentication failures).*?)(?: \[preauth\])?$",
         K.preauth_disconnect),
    Rule("sshd",
         r"(?:Connection (?:closed|reset) by|Disconnected from)"
         rf"(?: (?:(?:invalid|authenticating) )?user (?P<user>.*))? {_FROM} \[preauth\]$",
         K.preauth_disconnect),
    Rule("sshd",
         r"(?:Connection (?:closed|reset) by|Disconnected from)"
         rf"(?: (?:(?:invalid|authenticating) )?user (?P<user>.*))? {_FROM}$",
         K.session_closed),
    Rule("sshd",
         rf"Received disconnect from {_FROM}:\s*\d+: (?P<reason>.*?) \[preauth\]$",
         K.preauth_disconnect),
    Rule("sshd",
         rf"Received disconnect from {_FROM}:\s*\d+: (?P<reason>(?!.* \[preauth\]$).*)$",
         K.session_closed),
    Rule("sshd", rf"Connection from {_FROM}(?: on .*)?$", K.connection),
    # -- dropbear -------------------------------------------------------------------------
    Rule("dropbear", rf"Bad password attempt for '(?P<user>.*)' from {_ADDR}$",
         K.failed, counts=True, method="password"),
    Rule("dropbear", rf"Too-long password attempt for '(?P<user>.*)' from {_ADDR}$",
         K.failed, counts=True, method="password", reason="password too long"),
    Rule("dropbear",
         r"(?:Password auth succeeded|Auth succeeded with blank password) "
         rf"for '(?P<user>.*)' from {_ADDR}(?:, extra auth required)?$",
         K.accepted, method="password"),
    Rule("dropbear",
         r"Pubkey auth succeeded for '(?P<user>.*)' with (?P<key_type>\S+) key (?P<key>\S+) "
         rf"from {_ADDR}(?:, extra auth required)?$",
         K.accepted, method="publickey"),
    Rule("dropbear",
         rf"Pubkey auth bad signature for '(?P<user>.*)' with key (?P<key>\S+) from {_ADDR}$",
         K.failed, counts=True, method="publickey", reason="bad signature"),
    Rule("dropbear", r"Login attempt for nonexistent user",
         K.invalid_user, counts=True, recall=True),
    Rule("dropbear", r"Max auth tries reached - user '(?P<user>.*)'$",
         K.max_attempts, recall=True),
    Rule("dropbear",
         rf"Exit before auth(?: from <{_ADDR_IN}>)?: "
         r"(?:\(user '(?P<user>.*)', (?P<fails>\d+) fails\): )?(?P<reason>.*)$",
         K.preauth_disconnect, recall=True),
    Rule("dropbear", rf"Exit \((?P<user>.*)\)(?: from <{_ADDR_IN}>)?: (?P<reason>.*)$",
         K.session_closed, recall=True),
    Rule("dropbear", rf"Child connection from {_ADDR}$", K.connection, remember=True),
)  # fmt: skip

_BY_DAEMON: dict[str, tuple[Rule, ...]] = {
    daemon: tuple(rule for rule in RULES if rule.daemon == daemon)
    for daemon in dict.fromkeys(rule.daemon for rule in RULES)
}


def daemon_of(app: str | None) -> str | None:
    """The daemon of :data:`RULES` a syslog program name is (``sshd-session`` is sshd)."""
    if app is None:
        return None
    if app == "dropbear":
        return "dropbear"
    if app.startswith("sshd"):  # sshd, and sshd-session of OpenSSH 9.8+
        return "sshd"
    return None


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
        """The SSH event in ``record`` (the first row of :data:`RULES` that matches), or None."""
        daemon = daemon_of(record.app)
        if daemon is None:
            return None
        msg = record.message
        for rule in _BY_DAEMON[daemon]:
            m = rule.regex.match(msg)
            if m is not None:
                return self._event(rule, m.groupdict(), record)
        return None

    def _event(self, rule: Rule, g: dict[str, str | None], r: SyslogRecord) -> SshEvent:
        source = g.get("source") or None
        port = int(g["port"]) if g.get("port") else None
        if rule.remember:
            self._remember(r, source, port)
        elif rule.recall and source is None:
            source, port = self._client_of(r)
        key = g.get("key")
        if g.get("key_type") is not None:
            key = f"{g['key_type']} {key}"
        return SshEvent(
            rule.kind, rule.daemon, source, port, g.get("user"),
            g.get("method", rule.method),
            counts=rule.counts,
            fails=int(g["fails"]) if g.get("fails") else None,
            reason=g.get("reason", rule.reason),
            key=key, hostname=r.hostname, pid=r.pid,
        )  # fmt: skip

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
