"""A full export of a big event log streams, and the service stays responsive meanwhile.

With 200,000 of Alice's events in the database, ``curl`` (a separate process, so only the
server's work is on the event loop) downloads her whole CSV and JSON Lines exports while a
timer task in the server's event loop measures its longest stall and a second client keeps
asking for one event. The body must arrive in chunks (first bytes long before the end) and
hold every row. Paging by arms (a user's own events, each of their VMs) is checked
against the rows on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import csv
import gc
import io
import json
from pathlib import Path
from typing import Any

from sqlalchemy import insert, or_, select

from tests.helpers import wait_for
from twarga_lab.db import Database, Event
from twarga_lab.db.models import VM, User, utcnow
from twarga_lab.services import Identity
from twarga_lab.services.soc import EventQuery, SocService

ROWS = 200_000
MAX_STALL = 0.050  # seconds


def bulk_insert(db: Any, user: str, count: int) -> None:
    now = utcnow()
    rows = [
        {"created_at": now, "type": "security", "severity": "warning",
         "message": f"failed SSH login #{i} to VM web as root from 203.0.113.{i % 250}",
         "user_name": user, "source": f"203.0.113.{i % 250}",
         "details": {"action": "ssh_failed", "login": "root", "n": i}}
        for i in range(count)
    ]  # fmt: skip
    with db.session() as session:
        for start in range(0, count, 20_000):
            session.execute(insert(Event), rows[start : start + 20_000])


class StallProbe:
    """Sleeps 5 ms at a time in the server's loop and records how late it wakes."""

    def __init__(self) -> None:
        self.max_stall = 0.0
        self.samples = 0
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + 0.005
            await asyncio.sleep(0.005)
            self.max_stall = max(self.max_stall, loop.time() - expected)
            self.samples += 1

    def stop(self) -> None:
        self._task.cancel()


PINGER = """
import json, sys, time, urllib.request
url, deadline, worst, n = sys.argv[1], time.monotonic() + float(sys.argv[2]), 0.0, 0
while time.monotonic() < deadline:
    started = time.monotonic()
    req = urllib.request.Request(url, headers={"Authorization": "token bob-token"})
    with urllib.request.urlopen(req) as reply:
        assert reply.status == 200 and isinstance(json.load(reply), list)
    worst, n = max(worst, time.monotonic() - started), n + 1
    time.sleep(0.02)
print(json.dumps({"worst": worst, "requests": n}))
"""


async def download(url: str, out: Path) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail", "-N", "-D", str(out) + ".headers", "-o", str(out),
        "-H", "Authorization: token alice-token",
        "-w", "%{time_starttransfer} %{time_total} %{size_download}", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    first, total, size = (float(x) for x in stdout.split())
    return {"first_byte": first, "total": total, "bytes": size}


async def test_a_full_export_streams_all_rows_without_stalling_the_loop(
    twarga, api, jp_http_port, jp_base_url, tmp_path
):
    db = twarga.services.db
    await api("GET", "me", user="alice")  # alice exists (her first-seen event)
    await asyncio.to_thread(bulk_insert, db, "alice", ROWS)
    await asyncio.to_thread(bulk_insert, db, "bob", 1000)
    with db.session() as session:
        own_vms = select(VM.id).join(User, VM.owner_id == User.id).where(User.name == "alice")
        expected = set(
            session.scalars(
                select(Event.id).where(or_(Event.user_name == "alice", Event.vm_id.in_(own_vms)))
            )
        )
    assert len(expected) > ROWS

    base = f"http://127.0.0.1:{jp_http_port}{jp_base_url}twarga/api/soc/"
    results: dict[str, Any] = {}
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"export.{fmt}"
        pinger = await asyncio.create_subprocess_exec(
            "/usr/bin/python3", "-c", PINGER, f"{base}events?limit=1", "4",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        # The setup's 200,000 inserted rows left garbage that would make the collector's
        # next full pass (hundreds of ms in a process this size) land mid-measurement.
        gc.collect()
        probe = StallProbe()
        await wait_for(_probed(probe), timeout=5)
        try:
            timing = await download(f"{base}events.{fmt}?limit=all", out)
        finally:
            probe.stop()
        pinged = json.loads((await pinger.communicate())[0])
        headers = (tmp_path / f"export.{fmt}.headers").read_text().lower()
        assert "transfer-encoding: chunked" in headers

        if fmt == "csv":
            with out.open(newline="") as f:
                ids = [int(row["id"]) for row in csv.DictReader(f)]
        else:
            with out.open() as f:
                ids = [json.loads(line)["id"] for line in f]
        assert len(ids) == len(expected) and set(ids) == expected
        assert ids == sorted(ids, reverse=True)  # newest first, as the listing
        results[fmt] = {**timing, "max_stall": probe.max_stall, **pinged}
        print(
            f"\n{fmt}: {len(ids)} rows, {timing['bytes'] / 1e6:.1f} MB in {timing['total']:.2f} s"
            f" (first byte at {timing['first_byte'] * 1000:.0f} ms); longest loop stall "
            f"{probe.max_stall * 1000:.1f} ms over {probe.samples} samples; "
            f"{pinged['requests']} concurrent listings, slowest {pinged['worst'] * 1000:.0f} ms"
        )
        assert probe.max_stall < MAX_STALL, results
        # Other users' listings keep being answered within a second: on 2 cores they share
        # SQLite and the worker threads with the export's pages (0.61 s seen in CI once).
        # A listing never waits for the export: it is answered within a third of the
        # export's time (0.6-1.6 s seen on 2 loaded cores, for a 7 s export), or 1 s.
        assert pinged["worst"] < max(1.0, timing["total"] / 3), results
        # Streamed: the first page went out long before the last.
        assert timing["first_byte"] < timing["total"] / 4, results

    # Listings stay capped whatever the export may do.
    reply = await api("GET", "soc/events", user="alice", params={"limit": "100000"})
    assert reply.status == 422 and reply.json["reason"] == "out_of_range"


def _probed(probe: StallProbe) -> Any:
    async def ready() -> bool:
        return probe.samples > 3

    return ready


def _paging_matches_the_visible_rows(url: str) -> None:
    """Pages of a user's events (own, or about their VMs) are exactly the visible rows, on
    any database, through listings and both export formats."""
    db = Database(url).open()
    try:
        with db.session() as session:
            alice, bob = User(name="alice"), User(name="bob")
            vms = [
                VM(owner=owner, name=f"vm-{i}", domain_name=f"tp-{i}", image="twarga/tiny",
                   os_type="linux", ram_mb=512, cpu=1, disk_gb=10)
                for i, owner in enumerate([alice, alice, bob])
            ]  # fmt: skip
            session.add_all(vms)
            session.flush()
            rows = []
            for i in range(2500):
                vm = vms[i % 3]
                rows.append(
                    {"created_at": utcnow(), "type": "vm", "severity": "info",
                     "message": f'event "{i}", with, commas', "details": {"i": i, "s": "é\\n"},
                     "vm_id": vm.id, "user_name": "alice" if i % 5 == 0 else None}
                )  # fmt: skip
            session.execute(insert(Event), rows)
            mine = {vms[0].id, vms[1].id}
            expected = [
                e for e in session.execute(select(Event.id, Event.vm_id, Event.user_name))
                if e.vm_id in mine or e.user_name == "alice"
            ]  # fmt: skip
        soc = SocService(db)
        alice_id = Identity("alice", False)
        want = sorted((e.id for e in expected), reverse=True)
        listed, before = [], None
        while True:
            page = soc.list_events(alice_id, EventQuery(700, before_id=before))
            listed += page
            if len(page) < 700:
                break
            before = page[-1]["id"]
        assert [e["id"] for e in listed] == want
        tail = soc.list_events(alice_id, EventQuery(1000, since_id=want[10]))
        assert [e["id"] for e in tail] == sorted(want[:10])
        text, count, _ = soc.export_page(alice_id, EventQuery(1000), "jsonl", True)
        assert [json.loads(line) for line in text.splitlines()] == listed[:1000] and count == 1000
        text, count, _ = soc.export_page(alice_id, EventQuery(1000), "csv", True)
        for row, event in zip(csv.DictReader(io.StringIO(text)), listed, strict=False):
            assert json.loads(row["details"]) == event["details"]
            assert row["message"] == event["message"] and int(row["id"]) == event["id"]
            assert row["created_at"] == event["created_at"]
        vm_only = soc.list_events(alice_id, EventQuery(1000, vm_id=vms[2].id))  # Bob's VM
        assert {e["user_name"] for e in vm_only} == {"alice"}  # only her own events on it
    finally:
        db.dispose()


def test_paging_on_sqlite(tmp_path):
    _paging_matches_the_visible_rows(f"sqlite:///{tmp_path / 'p.db'}")


def test_paging_on_postgresql(postgres_url):
    _paging_matches_the_visible_rows(postgres_url)
