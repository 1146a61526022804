"""The SSH log parser's table of rows: each row is reached by a line of its own, and OpenSSH
9.2 as Debian 12 logs it (through rsyslog, in the formats rsyslog writes and forwards) is read.

The dropbear samples are what Debian's dropbear 2022.83 printed in the tiny image; the sshd
ones are OpenSSH 9.2p1's wording (Debian 12), ``Disconnecting: Too many authentication
failures`` is older OpenSSH's.
"""

from __future__ import annotations

import pytest

from twarga_lab.services.sshlog import RULES, SshEventKind, SshLogParser
from twarga_lab.services.syslog_format import parse_syslog

K = SshEventKind

# (daemon, message, kind): one line for every row of RULES.
SAMPLES = [
    ("sshd", "Failed password for root from 203.0.113.5 port 40022 ssh2", K.failed),
    ("sshd", "Failed publickey for invalid user bob from 192.0.2.12 port 40031 ssh2: "
             "RSA SHA256:4kX1nwHjAoO6kdDVJ0nFLhQ5mW5ZzUGEaRr8qSxiXhg", K.failed),
    ("sshd", "Failed publickey for alice from 192.0.2.11 port 40030 ssh2: "
             "RSA SHA256:4kX1nwHjAoO6kdDVJ0nFLhQ5mW5ZzUGEaRr8qSxiXhg", K.failed),
    ("sshd", "Accepted publickey for twarga from 10.0.2.2 port 43210 ssh2: ED25519 "
             "SHA256:0gaoau286DAzW1M1GaY4rhUVDiz4wDq4gdc/m55VSyE", K.accepted),
    ("sshd", "Invalid user oracle from 198.51.100.23 port 33210", K.invalid_user),
    ("sshd", "error: maximum authentication attempts exceeded for root from 203.0.113.5 "
             "port 40026 ssh2 [preauth]", K.max_attempts),
    ("sshd", "Disconnecting: Too many authentication failures for root [preauth]",
     K.max_attempts),
    ("sshd", "Disconnecting authenticating user twarga 10.0.2.2 port 43220: Too many "
             "authentication failures [preauth]", K.max_attempts),
    ("sshd", "Disconnecting invalid user admin 10.0.2.2 port 43222: Change of username or "
             "service not allowed: (admin,ssh-connection) -> (root,ssh-connection) [preauth]",
     K.preauth_disconnect),
    ("sshd", "Connection closed by authenticating user root 203.0.113.5 port 40022 [preauth]",
     K.preauth_disconnect),
    ("sshd", "Disconnected from user twarga 10.0.2.2 port 43210", K.session_closed),
    ("sshd", "Received disconnect from 203.0.113.5 port 40022:11: Bye Bye [preauth]",
     K.preauth_disconnect),
    ("sshd", "Received disconnect from 10.0.2.2 port 43210:11: disconnected by user",
     K.session_closed),
    ("sshd", 'Connection from 10.0.2.2 port 43210 on 10.0.2.15 port 22 rdomain ""',
     K.connection),
    ("dropbear", "Bad password attempt for 'root' from 10.0.2.2:34454", K.failed),
    ("dropbear", "Too-long password attempt for 'root' from 10.0.2.2:34460", K.failed),
    ("dropbear", "Password auth succeeded for 'root' from 10.0.2.2:34462", K.accepted),
    ("dropbear", "Pubkey auth succeeded for 'root' with ssh-ed25519 key "
                 "SHA256:0gaoau286DAzW1M1GaY4rhUVDiz4wDq4gdc/m55VSyE from 10.0.2.2:34468",
     K.accepted),
    ("dropbear", "Pubkey auth bad signature for 'root' with key "
                 "SHA256:0gaoau286DAzW1M1GaY4rhUVDiz4wDq4gdc/m55VSyE from 10.0.2.2:34470",
     K.failed),
    ("dropbear", "Login attempt for nonexistent user", K.invalid_user),
    ("dropbear", "Max auth tries reached - user 'is invalid'", K.max_attempts),
    ("dropbear", "Exit before auth from <10.0.2.2:34454>: (user 'root', 1 fails): "
                 "Exited normally", K.preauth_disconnect),
    ("dropbear", "Exit (root) from <10.0.2.2:34462>: Disconnect received", K.session_closed),
    ("dropbear", "Child connection from 10.0.2.2:34464", K.connection),
]  # fmt: skip


@pytest.mark.parametrize(("daemon", "message", "kind"), SAMPLES, ids=[s[1][:40] for s in SAMPLES])
def test_each_sample_is_matched_by_one_row_only(daemon, message, kind):
    rows = [rule for rule in RULES if rule.regex.match(message)]
    assert [(rule.daemon, rule.kind) for rule in rows] == [(daemon, kind)]
    event = SshLogParser().parse_line(f"<84>Nov 27 07:56:25 target {daemon}[149]: {message}")
    assert (event.server, event.kind) == (daemon, kind)


def test_every_row_has_a_sample_of_its_own():
    reached = {
        next(i for i, rule in enumerate(RULES) if rule.regex.match(message))
        for _, message, _ in SAMPLES
    }
    assert reached == set(range(len(RULES)))


def test_a_known_users_keys_do_not_count_but_an_unknown_users_do():
    parser = SshLogParser()
    known, unknown, password = (
        parser.parse_line(f"<38>Dec  2 15:01:02 web1 sshd[812]: {message}")
        for message in (SAMPLES[2][1], SAMPLES[1][1], SAMPLES[0][1])
    )
    assert (known.user, known.method, known.counts) == ("alice", "publickey", False)
    assert (unknown.user, unknown.method, unknown.counts) == ("bob", "publickey", True)
    assert (password.user, password.method, password.counts) == ("root", "password", True)


# A Debian 12 guest: a scan for user names, a password guesser giving up after six tries,
# then the owner logging in with their key and out again (OpenSSH 9.2p1, LogLevel INFO).
DEBIAN_12 = [
    ("Invalid user admin from 10.0.2.2 port 43214", K.invalid_user, "admin", 43214, False),
    ("Failed password for invalid user admin from 10.0.2.2 port 43214 ssh2",
     K.failed, "admin", 43214, True),
    ("Connection closed by invalid user admin 10.0.2.2 port 43214 [preauth]",
     K.preauth_disconnect, "admin", 43214, False),
    *[("Failed password for twarga from 10.0.2.2 port 43216 ssh2",
       K.failed, "twarga", 43216, True)] * 6,
    ("error: maximum authentication attempts exceeded for twarga from 10.0.2.2 port 43216 "
     "ssh2 [preauth]", K.max_attempts, "twarga", 43216, False),
    ("Disconnected from authenticating user twarga 10.0.2.2 port 43216 [preauth]",
     K.preauth_disconnect, "twarga", 43216, False),
    # a client offering more keys than MaxAuthTries (6) allows
    ("Disconnecting authenticating user twarga 10.0.2.2 port 43220: Too many authentication "
     "failures [preauth]", K.max_attempts, "twarga", 43220, False),
    ("Accepted publickey for twarga from 10.0.2.2 port 43218 ssh2: ED25519 "
     "SHA256:0gaoau286DAzW1M1GaY4rhUVDiz4wDq4gdc/m55VSyE", K.accepted, "twarga", 43218, False),
    ("Received disconnect from 10.0.2.2 port 43218:11: disconnected by user",
     K.session_closed, None, 43218, False),
    ("Disconnected from user twarga 10.0.2.2 port 43218", K.session_closed, "twarga", 43218,
     False),
]  # fmt: skip


@pytest.mark.parametrize(
    "template",
    [
        # rsyslog's file format on Debian 12 (RSYSLOG_FileFormat: RFC 3339, microseconds)
        "2026-12-02T15:01:02.123456+00:00 web1 sshd[812]: {}",
        # rsyslog forwarding in RFC 5424 (RSYSLOG_SyslogProtocol23Format), authpriv.info
        "<86>1 2026-12-02T15:01:02.123456+00:00 web1 sshd 812 - - {}",
        # rsyslog forwarding in RFC 3164 (its default for omfwd)
        "<86>Dec  2 15:01:02 web1 sshd[812]: {}",
    ],
    ids=["file", "rfc5424", "rfc3164"],
)
def test_openssh_9_2_on_debian_12_is_read_in_rsyslogs_formats(template):
    parser = SshLogParser()
    seen = []
    for message, *_ in DEBIAN_12:
        line = template.format(message)
        record = parse_syslog(line)
        assert (record.hostname, record.app, record.pid) == ("web1", "sshd", 812)
        event = parser.parse_line(line)
        seen.append((event.kind, event.user, event.port, event.counts))
        assert (event.server, event.source, event.pid) == ("sshd", "10.0.2.2", 812)
    assert seen == [tuple(expected) for _, *expected in DEBIAN_12]
    assert sum(counts for *_, counts in seen) == 7  # one unknown user's password, six of twarga
