"""The SSH log parser on real sshd and dropbear lines, in every syslog format it reads.

dropbear's lines are what Debian's dropbear 2022.83 printed in the tiny image (captured from
a guest's syslog channel); sshd's are OpenSSH 9.x's.
"""

from __future__ import annotations

import pytest

from twarga_lab.services.sshlog import SshEventKind, SshLogParser
from twarga_lab.services.syslog_format import parse_syslog

K = SshEventKind

# (message, program, kind, source, port, user, method, counts)
SSHD = [
    ("Accepted password for root from 192.0.2.10 port 51234 ssh2",
     K.accepted, "192.0.2.10", 51234, "root", "password", False),
    ("Accepted publickey for alice from 192.0.2.11 port 40022 ssh2: ED25519 "
     "SHA256:0gaoau286DAzW1M1GaY4rhUVDiz4wDq4gdc/m55VSyE",
     K.accepted, "192.0.2.11", 40022, "alice", "publickey", False),
    ("Failed password for root from 203.0.113.5 port 40022 ssh2",
     K.failed, "203.0.113.5", 40022, "root", "password", True),
    ("Failed password for invalid user admin from 203.0.113.5 port 40024 ssh2",
     K.failed, "203.0.113.5", 40024, "admin", "password", True),
    ("Failed keyboard-interactive/pam for root from 2001:db8::7 port 4444 ssh2",
     K.failed, "2001:db8::7", 4444, "root", "keyboard-interactive/pam", True),
    ("Failed publickey for alice from 192.0.2.11 port 40030 ssh2: RSA SHA256:abc",
     K.failed, "192.0.2.11", 40030, "alice", "publickey", False),
    ("Failed publickey for invalid user bob from 192.0.2.12 port 40031 ssh2: RSA SHA256:abc",
     K.failed, "192.0.2.12", 40031, "bob", "publickey", True),
    ("Invalid user oracle from 198.51.100.23 port 33210",
     K.invalid_user, "198.51.100.23", 33210, "oracle", None, False),
    ("Connection closed by authenticating user root 203.0.113.5 port 40022 [preauth]",
     K.preauth_disconnect, "203.0.113.5", 40022, "root", None, False),
    ("Connection closed by invalid user oracle 198.51.100.23 port 33210 [preauth]",
     K.preauth_disconnect, "198.51.100.23", 33210, "oracle", None, False),
    ("Connection closed by 198.51.100.24 port 33300 [preauth]",
     K.preauth_disconnect, "198.51.100.24", 33300, None, None, False),
    ("Disconnected from invalid user test 198.51.100.25 port 34000 [preauth]",
     K.preauth_disconnect, "198.51.100.25", 34000, "test", None, False),
    ("Received disconnect from 203.0.113.5 port 40022:11: Bye Bye [preauth]",
     K.preauth_disconnect, "203.0.113.5", 40022, None, None, False),
    ("error: maximum authentication attempts exceeded for root from 203.0.113.5 port 40026 "
     "ssh2 [preauth]",
     K.max_attempts, "203.0.113.5", 40026, "root", None, False),
    ("Disconnected from user alice 192.0.2.11 port 40022",
     K.session_closed, "192.0.2.11", 40022, "alice", None, False),
    ("Received disconnect from 192.0.2.11 port 40022:11: disconnected by user",
     K.session_closed, "192.0.2.11", 40022, None, None, False),
]  # fmt: skip

DROPBEAR = [
    ("Bad password attempt for 'root' from 10.0.2.2:34454",
     K.failed, "10.0.2.2", 34454, "root", "password", True),
    ("Too-long password attempt for 'root' from 10.0.2.2:34460",
     K.failed, "10.0.2.2", 34460, "root", "password", True),
    ("Password auth succeeded for 'root' from 10.0.2.2:34462",
     K.accepted, "10.0.2.2", 34462, "root", "password", False),
    ("Pubkey auth succeeded for 'root' with ssh-ed25519 key "
     "SHA256:0gaoau286DAzW1M1GaY4rhUVDiz4wDq4gdc/m55VSyE from 10.0.2.2:34468",
     K.accepted, "10.0.2.2", 34468, "root", "publickey", False),
    ("Exit before auth from <10.0.2.2:34454>: (user 'root', 1 fails): Exited normally",
     K.preauth_disconnect, "10.0.2.2", 34454, "root", None, False),
    ("Exit before auth from <10.0.2.2:34464>: Exited normally",
     K.preauth_disconnect, "10.0.2.2", 34464, None, None, False),
    ("Exit (root) from <10.0.2.2:34462>: Disconnect received",
     K.session_closed, "10.0.2.2", 34462, "root", None, False),
]  # fmt: skip


def formats(program: str, message: str) -> list[str]:
    """The same message as four kinds of syslog line."""
    return [
        # RFC 3164 as a relay sends it (authpriv.warning = 84)
        f"<84>Nov 27 07:56:25 target {program}[149]: {message}",
        # RFC 3164 from busybox syslogd -R: no hostname
        f"<84>Nov 27 07:56:25 {program}[149]: {message}",
        # RFC 5424, with structured data and a BOM before the message
        f'<84>1 2026-11-27T07:56:25.123456+00:00 target {program} 149 - [origin ip="10.0.2.15"]'
        f" \ufeff{message}",
        # busybox syslogd's own file format: what the tiny image writes into its channel
        f"Nov 27 07:56:25 target authpriv.warn {program}[149]: {message}",
    ]


CASES = [
    pytest.param(line, *case[1:], id=f"{program}-{i}-{n}")
    for program, table in (("sshd", SSHD), ("dropbear", DROPBEAR))
    for i, case in enumerate(table)
    for n, line in enumerate(formats(program, case[0]))
]


@pytest.mark.parametrize(("line", "kind", "source", "port", "user", "method", "counts"), CASES)
def test_ssh_lines_are_classified(line, kind, source, port, user, method, counts):
    event = SshLogParser().parse_line(line)
    assert event is not None
    assert (event.kind, event.source, event.port, event.user, event.method, event.counts) == (
        kind,
        source,
        port,
        user,
        method,
        counts,
    )
    assert event.pid == 149
    assert event.severity == ("warning" if kind in (K.failed, K.invalid_user, K.max_attempts)
                              else "info")  # fmt: skip


def test_dropbear_lines_without_an_address_take_it_from_their_process():
    parser = SshLogParser()
    lines = [
        "Nov 27 07:56:26 target authpriv.info dropbear[153]: Child connection from 10.0.2.2:34464",
        "Nov 27 07:56:27 target authpriv.warn dropbear[153]: Login attempt for nonexistent user",
        "Nov 27 07:56:28 target authpriv.info dropbear[153]: Max auth tries reached - "
        "user 'is invalid'",
        "Nov 27 07:56:29 target authpriv.info dropbear[154]: Login attempt for nonexistent user",
    ]
    connection, unknown, max_tries, orphan = (parser.parse_line(line) for line in lines)
    assert connection.kind is K.connection
    assert (unknown.kind, unknown.source, unknown.port, unknown.counts) == (
        K.invalid_user,
        "10.0.2.2",
        34464,
        True,
    )
    assert (max_tries.kind, max_tries.source, max_tries.user) == (
        K.max_attempts,
        "10.0.2.2",
        "is invalid",
    )
    # Another process with no connection line: the address is unknown, not guessed.
    assert orphan.source is None


def test_a_user_name_cannot_choose_the_source():
    forged = "x from 6.6.6.6 port 22 ssh2"
    sshd = SshLogParser().parse_line(
        f"<38>Nov 27 08:00:01 web1 sshd[7]: Failed password for invalid user {forged} "
        "from 203.0.113.9 port 5000 ssh2"
    )
    assert (sshd.source, sshd.port, sshd.user) == ("203.0.113.9", 5000, forged)
    dropbear = SshLogParser().parse_line(
        "<84>Nov 27 08:00:01 dropbear[7]: Bad password attempt for "
        "'a' from 6.6.6.6:1' from 10.0.2.2:4000"
    )
    assert (dropbear.source, dropbear.user) == ("10.0.2.2", "a' from 6.6.6.6:1")


@pytest.mark.parametrize(
    "line",
    [
        "<86>Nov 27 07:56:13 exp-vm daemon.info udhcpc[132]: lease of 10.0.2.15 obtained",
        "Nov 27 07:56:13 exp-vm kern.info kernel: [   10.3] virtio_blk virtio3: [vdb] 712",
        "Nov 27 07:56:24 exp-vm authpriv.warn dropbear[139]: Waiting for kernel randomness",
        "<38>Nov 27 08:00:01 web1 sshd[1]: Server listening on 0.0.0.0 port 22.",
        "<38>Nov 27 08:00:01 web1 cron[1]: Failed password for root from 1.2.3.4 port 1 ssh2",
        "not syslog at all: sshd dropbear",
        "<999999>garbage sshd",
        "",
    ],
)
def test_other_lines_are_not_ssh_events(line):
    assert SshLogParser().parse_line(line) is None


def test_syslog_headers_are_split():
    r3164 = parse_syslog("<86>Nov  7 07:56:25 target dropbear[149]: hello: world")
    assert (r3164.priority, r3164.timestamp, r3164.hostname, r3164.app, r3164.pid) == (
        86,
        "Nov  7 07:56:25",
        "target",
        "dropbear",
        149,
    )
    assert r3164.message == "hello: world"
    r5424 = parse_syslog("<38>1 2026-11-27T08:00:01Z web1 sshd - ID47 - hi")
    assert (r5424.hostname, r5424.app, r5424.pid, r5424.message) == ("web1", "sshd", None, "hi")
    nil = parse_syslog("<38>1 - - - - - -")
    assert (nil.hostname, nil.app, nil.message) == (None, None, "")
    iso = parse_syslog("2026-11-27T08:00:01.123456+00:00 web1 sshd[5]: Accepted x")
    assert (iso.hostname, iso.app, iso.pid) == ("web1", "sshd", 5)
    assert parse_syslog(b"<13>Nov 27 08:00:01 host app: bytes too\r\n").message == "bytes too"
