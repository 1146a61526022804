"""SSH log classification: Twarga's parser vs. fail2ban, and brute-force detection latency.

1. Writes a 100,000-line auth.log (OpenSSH lines: accepted keys and passwords, failed
   passwords, invalid users, too many failures, preauth disconnects, from a few dozen
   sources, plus the usual cron/sudo noise) and classifies it with
   ``twarga_lab.services.sshlog`` and with Debian's ``fail2ban-regex`` and its stock
   ``/etc/fail2ban/filter.d/sshd.conf`` (``--raw --usedns=no``: no DNS lookups), timing
   both on the same file in the same run. Goal: ours at least 5x the lines per second.
2. Starts the real syslog receiver (UDP on 127.0.0.1, ephemeral port) with the SOC on a
   fresh SQLite database and measures, per source, the time from sending the 5th failed
   login to the critical brute-force event being in the database. Goal: under 1 s.

    .venv/bin/python bench/soc.py [--lines 100000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twarga_lab.db import Database, Event  # noqa: E402
from twarga_lab.db.models import VM, User, VMStatus  # noqa: E402
from twarga_lab.services.soc import SocService  # noqa: E402
from twarga_lab.services.sshlog import SshLogParser  # noqa: E402
from twarga_lab.services.syslog import SyslogIngest, SyslogReceiver, TrustedSources  # noqa: E402

FILTER = Path("/etc/fail2ban/filter.d/sshd.conf")
USERS = ["root", "admin", "test", "oracle", "ubuntu", "postgres", "git", "pi", "user", "ftp"]
STAFF = ["alice", "bob", "carol"]


def write_auth_log(path: Path, count: int, seed: int = 7) -> None:
    """``count`` realistic auth.log lines, deterministic for a given seed."""
    rng = random.Random(seed)
    attackers = [f"203.0.113.{i}" for i in range(1, 31)] + [f"198.51.100.{i}" for i in range(1, 21)]
    staff_ips = [f"192.0.2.{i}" for i in range(10, 15)]
    clock = datetime(2026, 11, 27, 0, 0, 0)
    pid = 20000
    lines: list[str] = []

    def emit(program: str, message: str) -> None:
        stamp = clock.strftime("%b %d %H:%M:%S")
        lines.append(f"{stamp} web1 {program}: {message}")

    while len(lines) < count:
        clock += timedelta(seconds=rng.randint(0, 3))
        pid += 1
        sshd = f"sshd[{pid}]"
        port = rng.randint(30000, 65000)
        roll = rng.random()
        if roll < 0.40:  # password guessing on a real account
            ip, user = rng.choice(attackers), rng.choice(["root", "root", "admin"])
            for _ in range(rng.randint(1, 4)):
                emit(sshd, f"Failed password for {user} from {ip} port {port} ssh2")
            if rng.random() < 0.3:
                emit(sshd, f"error: maximum authentication attempts exceeded for {user} "
                           f"from {ip} port {port} ssh2 [preauth]")  # fmt: skip
                emit(sshd, f"Disconnecting authenticating user {user} {ip} port {port}: "
                           "Too many authentication failures [preauth]")  # fmt: skip
            else:
                emit(sshd, f"Connection closed by authenticating user {user} {ip} port {port} "
                           "[preauth]")  # fmt: skip
        elif roll < 0.70:  # user-name scanning
            ip, user = rng.choice(attackers), rng.choice(USERS)
            emit(sshd, f"Invalid user {user} from {ip} port {port}")
            if rng.random() < 0.7:
                emit(sshd, f"Failed password for invalid user {user} from {ip} port {port} ssh2")
                emit(sshd, f"Received disconnect from {ip} port {port}:11: Bye Bye [preauth]")
                emit(sshd, f"Disconnected from invalid user {user} {ip} port {port} [preauth]")
            else:
                emit(sshd, f"Connection closed by invalid user {user} {ip} port {port} [preauth]")
        elif roll < 0.85:  # staff logging in and out
            ip, user = rng.choice(staff_ips), rng.choice(STAFF)
            if rng.random() < 0.8:
                emit(sshd, f"Accepted publickey for {user} from {ip} port {port} ssh2: ED25519 "
                           "SHA256:0gaoau286DAzW1M1GaY4rhUVDiz4wDq4gdc/m55VSyE")  # fmt: skip
            else:
                emit(sshd, f"Accepted password for {user} from {ip} port {port} ssh2")
            emit(sshd, f"pam_unix(sshd:session): session opened for user {user}(uid=1000) "
                       "by (uid=0)")  # fmt: skip
            emit(sshd, f"Received disconnect from {ip} port {port}:11: disconnected by user")
            emit(sshd, f"Disconnected from user {user} {ip} port {port}")
            emit(sshd, f"pam_unix(sshd:session): session closed for user {user}")
        elif roll < 0.92:  # probes that never authenticate
            ip = rng.choice(attackers)
            emit(sshd, f"Connection closed by {ip} port {port} [preauth]")
        else:  # the rest of an auth.log
            emit(f"CRON[{pid}]", "pam_unix(cron:session): session opened for user root(uid=0) "
                                 "by (uid=0)")  # fmt: skip
            emit(f"CRON[{pid}]", "pam_unix(cron:session): session closed for user root")
            if rng.random() < 0.2:
                emit("sudo", "   alice : TTY=pts/0 ; PWD=/home/alice ; USER=root ; "
                             "COMMAND=/usr/bin/apt update")  # fmt: skip
    path.write_text("".join(line + "\n" for line in lines[:count]))


def classify_ours(path: Path) -> tuple[float, int, int]:
    """Seconds to read and classify every line, SSH events found, failures counted."""
    started = time.perf_counter()
    parser = SshLogParser()
    events = counted = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            event = parser.parse_line(line)
            if event is not None:
                events += 1
                counted += event.counts
    return time.perf_counter() - started, events, counted


def classify_fail2ban(path: Path) -> tuple[float, int]:
    """Seconds fail2ban-regex takes on ``path`` and how many lines its filter matched."""
    tool = shutil.which("fail2ban-regex")
    if tool is None or not FILTER.exists():
        sys.exit("fail2ban-regex is missing: apt-get install fail2ban")
    started = time.perf_counter()
    done = subprocess.run(
        [tool, "--raw", "--usedns=no", "--print-no-missed", "--print-no-ignored",
         str(path), str(FILTER)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    found = re.search(r"^Lines: (\d+) lines, (\d+) ignored, (\d+) matched", done.stdout, re.M)
    if found is None:
        sys.exit(f"unexpected fail2ban-regex output:\n{done.stdout[-2000:]}")
    return elapsed, int(found.group(3))


async def detection_latency(rounds: int) -> list[float]:
    """Seconds from the 5th failure sent over UDP to the critical event in the database."""
    with tempfile.TemporaryDirectory(prefix="twarga-bench-soc-") as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'soc.db'}").open()
        soc = SocService(db, maxretry=5, findtime=600.0, bantime=600.0)
        with db.session() as session:  # the VM the lines are about
            owner = User(name="bench")
            session.add(owner)
            session.flush()
            session.add(
                VM(owner_id=owner.id, name="web1", image="twarga/tiny", os_type="linux",
                   ram_mb=512, cpu=1, disk_gb=10, status=VMStatus.running, domain_name="web1")
            )  # fmt: skip
        # Network lines count for a VM only from a sender trusted for it (the guests' own
        # channels need no such entry); here the bench's socket speaks for "web1".
        ingest = SyslogIngest(soc, trust=TrustedSources({"web1": ["127.0.0.1"]}))
        ingest.start()
        receiver = SyslogReceiver(ingest, "127.0.0.1", 0)
        await receiver.start()
        assert receiver.udp_port is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        target = ("127.0.0.1", receiver.udp_port)

        def count(severity: str, source: str) -> int:
            with db.session() as session:
                return len(
                    session.scalars(
                        select(Event.id).where(Event.severity == severity, Event.source == source)
                    ).all()
                )

        async def until(severity: str, source: str, n: int) -> None:
            while await asyncio.to_thread(count, severity, source) < n:
                await asyncio.sleep(0.001)

        latencies = []
        try:
            for r in range(rounds):
                source = f"198.18.{r // 250}.{r % 250 + 1}"
                lines = [
                    f"<84>Nov 27 08:00:0{n} web1 sshd[{1000 + n}]: Failed password for root "
                    f"from {source} port {40000 + n} ssh2"
                    for n in range(1, 6)
                ]
                for line in lines[:4]:
                    sock.sendto(line.encode(), target)
                await until("warning", source, 4)
                started = time.perf_counter()
                sock.sendto(lines[4].encode(), target)
                await until("critical", source, 1)
                latencies.append(time.perf_counter() - started)
        finally:
            sock.close()
            await receiver.stop()
            await ingest.stop()
            db.dispose()
        return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("twarga_lab").setLevel(logging.ERROR)  # no line per event on stderr

    with tempfile.TemporaryDirectory(prefix="twarga-bench-soc-") as tmp:
        log = Path(tmp) / "auth.log"
        write_auth_log(log, args.lines)
        ours, events, counted = classify_ours(log)
        theirs, matched = classify_fail2ban(log)
    print(f"auth log: {args.lines} lines of sshd, cron and sudo")
    print(
        f"twarga sshlog : {ours:7.3f} s  {args.lines / ours:10,.0f} lines/s  "
        f"({events} SSH events, {counted} counted failures)"
    )
    print(
        f"fail2ban-regex: {theirs:7.3f} s  {args.lines / theirs:10,.0f} lines/s  "
        f"({matched} lines matched by sshd.conf)"
    )
    print(f"ratio (twarga / fail2ban lines per second): {theirs / ours:.1f}x  (goal >= 5)")

    latencies = asyncio.run(detection_latency(args.rounds))
    print(
        f"brute-force detection over UDP 127.0.0.1 ({len(latencies)} sources): "
        f"median {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms  (goal < 1000 ms)"
    )


if __name__ == "__main__":
    main()
