"""The SOC: the security-event log as users and admins see it, statistics, exports and bans,
and the recording of SSH activity inside guests with brute-force detection.

Visibility: a user sees the events about them (``user_name``) and about their VMs; an admin
sees everything. Statistics are for admins.

Brute force follows fail2ban (``services.bans``): ``maxretry`` failures from one source
against one VM (scope ``vm:<id>``) within ``findtime`` seconds raise one critical event and
a ban of ``bantime`` seconds that doubles for repeat offenders. Under QEMU user networking
every SSH client reaches the guest from the same address (10.0.2.2, the host's end of the
forward), so the ban is recorded but not enforced; events say so (``"enforced": false``).

Why it is long: one service whose reads (listings, exports, statistics, bans) and writes
(SSH observations, flood notices, pruning) share the visibility rule and the ban policy;
the event query itself lives in schemas.soc and the parsers in sshlog and syslog.
"""

from __future__ import annotations

import asyncio
import csv
import io
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Text, and_, case, cast, delete, func, select, union
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select
from traitlets import Float, Int
from traitlets.config import LoggingConfigurable

from twarga_lab.db import Database
from twarga_lab.db.models import VM, AuthFailure, Ban, Event, User, VMStatus, utcnow
from twarga_lab.errors import Forbidden
from twarga_lab.schemas.soc import EventQuery
from twarga_lab.services import Identity
from twarga_lab.services.bans import BanPolicy, active_ban, record_failure
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.sshlog import SshEvent, SshEventKind

log = logging.getLogger(__name__)

HUB_SCOPE = "hub"  # the Hub login's failures (services.accounts): pruned by the Hub's rules

EXPORT_COLUMNS = (
    "id",
    "created_at",
    "type",
    "severity",
    "message",
    "user_name",
    "vm_id",
    "source",
    "details",
)
NOT_ENFORCED = (
    "QEMU user-mode networking: every SSH client reaches the guest from 10.0.2.2 through the "
    "127.0.0.1 port forward, so a ban cannot single the attacker out"
)
_SSH_MESSAGES = {
    SshEventKind.accepted: "SSH login to {target} as {user} from {source} ({method})",
    SshEventKind.failed: "failed SSH login to {target} as {user} from {source} ({method})",
    SshEventKind.invalid_user: "SSH login to {target} as unknown user {user} from {source}",
    SshEventKind.max_attempts: "too many SSH authentication failures on {target} as {user} "
    "from {source}",
    SshEventKind.preauth_disconnect: "SSH connection to {target} from {source} closed before login",
    SshEventKind.session_closed: "SSH session on {target} of {user} from {source} ended",
}


def event_to_json(event: Event) -> dict[str, Any]:
    """The public view of an event."""
    return {
        "id": event.id,
        "created_at": event.created_at.isoformat(),
        "type": event.type,
        "severity": event.severity,
        "message": event.message,
        "user_name": event.user_name,
        "vm_id": event.vm_id,
        "source": event.source,
        "details": event.details or {},
    }


_EVENT_COLUMNS = (
    Event.id, Event.created_at, Event.type, Event.severity, Event.message, Event.user_name,
    Event.vm_id, Event.source, Event.details,
)  # fmt: skip
# The stored JSON text of details, not a parsed dict (cast in SQL: psycopg parses JSON).
_EXPORT_COLUMNS = (*_EVENT_COLUMNS[:-1], cast(Event.details, Text))
MAX_PAGE = 1000  # rows of one listing, and of one export page
_MAX_ARMS = 100  # VMs read in index order each (SQLite allows 500 arms in a union)


def _row_to_json(row: Any) -> dict[str, Any]:
    """``event_to_json`` of a row of ``_EVENT_COLUMNS`` (no ORM object per row)."""
    return {
        "id": row.id,
        "created_at": row.created_at.isoformat(),
        "type": row.type,
        "severity": row.severity,
        "message": row.message,
        "user_name": row.user_name,
        "vm_id": row.vm_id,
        "source": row.source,
        "details": row.details or {},
    }


@dataclass(frozen=True)
class SshObservation:
    """An SSH event seen in a log stream, and which stream it came through."""

    event: SshEvent
    channel: str  # virtio (the VM's own channel), udp or tcp
    vm_id: int | None = None  # known for the VM's channel
    peer: str | None = None  # sender address on the network receiver
    received_at: datetime = field(default_factory=utcnow)
    # The domain a network sender is trusted for (``syslog_trusted_sources``); a network
    # line without one belongs to no VM, whatever hostname it claims.
    domain: str | None = None


@dataclass(frozen=True)
class FloodNotice:
    """A syslog source started dropping lines (one per flood burst)."""

    channel: str  # virtio, udp or tcp
    vm_id: int | None
    peer: str | None
    queue_size: int
    rate: float
    at: datetime = field(default_factory=utcnow)


def _valid_ip(source: str | None) -> str | None:
    if not source:
        return None
    try:
        return str(ipaddress.ip_address(source))
    except ValueError:
        return None


class SocService(LoggingConfigurable):
    """Event queries for the API, and SSH activity from guests into events and bans."""

    maxretry = Int(
        BanPolicy.maxretry,
        help="SSH brute force on a VM: failures from one source that raise the alarm.",
    ).tag(config=True)
    findtime = Float(
        BanPolicy.findtime,
        help="SSH brute force on a VM: the window (seconds) the failures must fall in.",
    ).tag(config=True)
    bantime = Float(
        BanPolicy.bantime,
        help="SSH brute force on a VM: the first ban's length in seconds; each further ban of "
        "the same source doubles it (recorded, not enforced under user-mode networking).",
    ).tag(config=True)
    event_retention_days = Float(
        90.0, help="Days SOC events are kept; older ones are deleted (in batches)."
    ).tag(config=True)
    prune_interval = Float(
        3600.0,
        help="""Seconds between two prunings of old SOC events and of SSH failure counts
        older than ``findtime`` (which can no longer add up to a ban); 0: never.""",
    ).tag(config=True)

    def __init__(self, db: Database, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.db = db
        # Pushes a ban into a lab VM (``LabService.enforce_ban``): (vm id, source) -> taken.
        self.enforcer: Callable[[int, str], bool] | None = None

    @property
    def policy(self) -> BanPolicy:
        """The brute-force rules of VMs' SSH servers, from the settings."""
        return BanPolicy(maxretry=self.maxretry, findtime=self.findtime, bantime=self.bantime)

    # -- visibility -------------------------------------------------------------------

    @staticmethod
    def _filters(query: EventQuery, stmt: Select[Any]) -> Select[Any]:
        """The query's filters and cursor, newest first (or oldest first after
        ``since_id``)."""
        if query.severity:
            stmt = stmt.where(Event.severity == query.severity)
        if query.type:
            stmt = stmt.where(Event.type == query.type)
        if query.vm_id is not None:
            stmt = stmt.where(Event.vm_id == query.vm_id)
        if query.since_id is not None:
            return stmt.where(Event.id > query.since_id).order_by(Event.id.asc())
        if query.before_id is not None:
            stmt = stmt.where(Event.id < query.before_id)
        return stmt.order_by(Event.id.desc())

    def _visible_ids(
        self, session: Session, identity: Identity, query: EventQuery, limit: int
    ) -> Any:
        """A subquery of the ids of one page of a user's events.

        "Their own or about their VMs" is an OR that no single index orders, so one query
        would sort every visible row for every page. Instead each arm (the user's name, each
        of their VMs) reads at most ``limit`` ids in index order from its cursor, and the
        union's first ``limit`` are the page: a page costs ``limit`` rows per arm."""
        vm_ids = list(
            session.scalars(
                select(VM.id).join(User, VM.owner_id == User.id)
                .where(User.name == identity.name).order_by(VM.id)
            )
        )  # fmt: skip
        if query.vm_id is not None:
            vm_ids = [v for v in vm_ids if v == query.vm_id]
        arms = [Event.user_name == identity.name]
        arms += [Event.vm_id == v for v in vm_ids[:_MAX_ARMS]]
        if len(vm_ids) > _MAX_ARMS:  # a long history of VMs: the rest in one (sorted) arm
            arms.append(Event.vm_id.in_(vm_ids[_MAX_ARMS:]))
        parts = [
            self._filters(query, select(Event.id).where(arm)).limit(limit).subquery()
            for arm in arms
        ]
        ids = union(*(select(p.c.id) for p in parts)).subquery()
        order = ids.c.id.asc() if query.since_id is not None else ids.c.id.desc()
        return select(ids.c.id.label("id")).order_by(order).limit(limit).subquery()

    # -- listing and export -------------------------------------------------------------

    def _page(
        self, session: Session, identity: Identity, query: EventQuery, columns: Any
    ) -> Select[Any]:
        """The statement of one page of visible events."""
        limit = min(query.limit, MAX_PAGE)
        if identity.admin:
            return self._filters(query, select(*columns)).limit(limit)
        ids = self._visible_ids(session, identity, query, limit)
        order = Event.id.asc() if query.since_id is not None else Event.id.desc()
        return select(*columns).join(ids, Event.id == ids.c.id).order_by(order)

    def list_events(self, identity: Identity, query: EventQuery) -> list[dict[str, Any]]:
        """Events the caller may see: newest first, or after ``since_id`` oldest first.

        At most ``query.limit`` rows, and never more than ``MAX_PAGE``: a bigger read is
        an export, which pages."""
        with self.db.session() as session:
            stmt = self._page(session, identity, query, _EVENT_COLUMNS)
            return [_row_to_json(row) for row in session.execute(stmt)]

    def export_page(
        self, identity: Identity, query: EventQuery, fmt: str, header: bool
    ) -> tuple[str, int, int | None]:
        """One page of an export, formatted (in a worker thread): the text, how many
        rows and the last row's id.

        Rows are written out as they are read, with ``details`` as the stored JSON text,
        so a page leaves no objects behind: nothing grows the garbage collector's oldest
        generation, whose full collections would hold the GIL (and the event loop). Every
        20 rows the GIL is offered to the event loop."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n") if fmt == "csv" else None
        if writer is not None and header:
            writer.writerow(EXPORT_COLUMNS)
        count, last = 0, None
        dumps = json.dumps
        with self.db.session() as session:
            rows = session.execute(self._page(session, identity, query, _EXPORT_COLUMNS))
            for id_, created, type_, severity, message, user, vm_id, source, details in rows:
                count, last = count + 1, id_
                if count % 20 == 0:
                    time.sleep(0)  # hand the GIL to the event loop now, not in 5 ms
                details = details if details and details != "null" else "{}"
                if writer is not None:
                    writer.writerow((
                        id_, created.isoformat(), type_, severity, message, user or "",
                        "" if vm_id is None else vm_id, source or "", details,
                    ))  # fmt: skip
                else:  # the keys in event_to_json's order, sorted as before
                    out.write(
                        f'{{"created_at": "{created.isoformat()}", "details": {details}, '
                        f'"id": {id_}, "message": {dumps(message)}, "severity": '
                        f'{dumps(severity)}, "source": {dumps(source)}, "type": {dumps(type_)}, '
                        f'"user_name": {dumps(user)}, "vm_id": {dumps(vm_id)}}}\n'
                    )
        return out.getvalue(), count, last

    async def export(
        self, identity: Identity, query: EventQuery, fmt: str, page_size: int = 1000
    ) -> AsyncIterator[str]:
        """The events of ``list_events`` (up to ``query.limit``) as CSV or JSON Lines, in
        chunks of one page each: every page is read and formatted in a worker thread, so
        memory and event-loop time stay bounded by the page, not the export."""
        page_size = min(page_size, MAX_PAGE)
        remaining = query.limit
        cursor = query
        first = True
        while remaining > 0:
            size = min(page_size, remaining)
            page_query = EventQuery(size, *(getattr(cursor, f) for f in _CURSOR_FIELDS))
            text, count, last = await asyncio.to_thread(
                self.export_page, identity, page_query, fmt, first
            )
            if text:
                yield text
            first = False
            remaining -= count
            if count < size or last is None:
                return
            if query.since_id is not None:
                cursor = EventQuery(size, query.severity, query.type, query.vm_id, since_id=last)
            else:
                cursor = EventQuery(size, query.severity, query.type, query.vm_id, before_id=last)

    # -- statistics ----------------------------------------------------------------------

    def statistics(self, identity: Identity, now: datetime | None = None) -> dict[str, Any]:
        """Totals by severity and type, the latest critical events, 24 hourly counts,
        active bans and the busiest sources of the last day (admins only)."""
        if not identity.admin:
            raise Forbidden("only admins may read SOC statistics", "admin_required")
        now = now or utcnow()
        current_hour = now.replace(minute=0, second=0, microsecond=0)
        starts = [current_hour - timedelta(hours=23 - i) for i in range(24)]
        with self.db.session() as session:
            total = session.scalar(select(func.count(Event.id))) or 0
            by_severity = {s.value: 0 for s in Severity}
            for severity, count in session.execute(
                select(Event.severity, func.count(Event.id)).group_by(Event.severity)
            ):
                by_severity[severity] = count
            by_type = {t.value: 0 for t in EventType}
            for type_, count in session.execute(
                select(Event.type, func.count(Event.id)).group_by(Event.type)
            ):
                by_type[type_] = count
            recent = session.scalars(
                select(Event).where(Event.severity == Severity.critical.value)
                .order_by(Event.id.desc()).limit(10)
            )  # fmt: skip
            recent_critical = [event_to_json(e) for e in recent]
            per_hour = self._per_hour(session, starts)
            day_ago = now - timedelta(hours=24)
            noisy = (
                select(Event.source, func.count(Event.id))
                .where(
                    Event.created_at >= day_ago,
                    Event.source.is_not(None),
                    Event.severity != Severity.info.value,
                )
                .group_by(Event.source)
                .order_by(func.count(Event.id).desc())
                .limit(10)
            )
            top_sources = [{"source": s, "count": n} for s, n in session.execute(noisy)]
            active_bans = session.scalar(select(func.count(Ban.id)).where(Ban.banned_until > now))
        return {
            "total_events": total,
            "by_severity": by_severity,
            "by_type": by_type,
            "recent_critical": recent_critical,
            "per_hour": per_hour,
            "top_sources": top_sources,
            "active_bans": active_bans or 0,
        }

    @staticmethod
    def _per_hour(session: Session, starts: list[datetime]) -> list[dict[str, Any]]:
        # One pass over the last day's rows (ix_events_created_at), bucketed by CASE.
        hour = timedelta(hours=1)
        buckets = [
            func.sum(case((and_(Event.created_at >= s, Event.created_at < s + hour), 1), else_=0))
            for s in starts
        ]
        per_hour = [
            {"start": s.isoformat(), "count": 0, **{sev.value: 0 for sev in Severity}}
            for s in starts
        ]
        rows = session.execute(
            select(Event.severity, *buckets)
            .where(Event.created_at >= starts[0])
            .group_by(Event.severity)
        )
        for severity, *counts in rows:
            for bucket, count in zip(per_hour, counts, strict=True):
                bucket["count"] += int(count or 0)
                bucket[severity] = bucket.get(severity, 0) + int(count or 0)
        return per_hour

    # -- bans -----------------------------------------------------------------------------

    def list_bans(self, identity: Identity, now: datetime | None = None) -> list[dict[str, Any]]:
        """Bans on the caller's VMs (admins: every ban, the Hub's too), newest first."""
        now = now or utcnow()
        with self.db.session() as session:
            vms = {
                f"vm:{vm_id}": (vm_id, name, owner)
                for vm_id, name, owner in session.execute(
                    select(VM.id, VM.name, User.name).join(User, VM.owner_id == User.id)
                )
            }
            result = []
            for ban in session.scalars(select(Ban).order_by(Ban.last_banned_at.desc())):
                vm = vms.get(ban.scope)
                if not identity.admin and (vm is None or vm[2] != identity.name):
                    continue
                result.append(
                    {
                        "scope": ban.scope,
                        "vm_id": vm[0] if vm else None,
                        "vm_name": vm[1] if vm else None,
                        "source": ban.source,
                        "ban_count": ban.ban_count,
                        "banned_until": ban.banned_until.isoformat(),
                        "last_banned_at": ban.last_banned_at.isoformat(),
                        "active": ban.banned_until > now,
                        "enforced": not ban.scope.startswith("vm:"),
                    }
                )
            return result

    # -- SSH activity ---------------------------------------------------------------------

    def record_ssh(self, observations: list[SshObservation]) -> int:
        """Turn SSH observations into security events (one transaction); failures count
        towards brute force per VM and source. Returns how many events were written."""
        written = 0
        with self.db.session() as session:
            for obs in observations:
                if obs.event.kind is SshEventKind.connection:
                    continue
                written += self._record_one(session, obs)
        return written

    def _resolve_vm(self, session: Session, obs: SshObservation) -> VM | None:
        """The VM an observation is about: its channel's, or the one its network sender is
        trusted for. A hostname alone never names a VM (anyone on the host can send one)."""
        vm = None
        if obs.vm_id is not None:
            vm = session.get(VM, obs.vm_id)
        elif obs.domain is not None:
            vm = session.scalar(select(VM).where(VM.domain_name == obs.domain))
        return vm if vm is not None and vm.status is not VMStatus.destroyed else None

    def _record_unattributed(self, session: Session, obs: SshObservation) -> int:
        """A network SSH line no VM vouches for: one system event for admins, no count."""
        ev = obs.event
        host = ev.hostname or "-"
        what = _SSH_MESSAGES[ev.kind].format(
            target=f"host {host}", user=ev.user or "?", method=ev.method or "?",
            source=_valid_ip(ev.source) or "an unknown address",
        )  # fmt: skip
        why = (
            "its VM is gone" if obs.channel == "virtio"
            else "its sender is not in syslog_trusted_sources"
        )  # fmt: skip
        record_event(
            session, EventType.system, Severity.info,
            f"unattributed syslog over {obs.channel} from {obs.peer or '?'}: {what} - "
            f"not attributed to any VM ({why})",
            source=_valid_ip(obs.peer),
            **{k: v for k, v in {
                "action": "syslog_unattributed", "ssh_action": f"ssh_{ev.kind.value}",
                "channel": obs.channel, "peer": obs.peer, "hostname": ev.hostname,
                "server": ev.server, "login": ev.user, "client": _valid_ip(ev.source),
            }.items() if v is not None},
        )  # fmt: skip
        return 1

    def record_floods(self, notices: list[FloodNotice]) -> int:
        """One warning event per flood burst of a syslog source."""
        with self.db.session() as session:
            for notice in notices:
                owner = None
                if notice.vm_id is not None:
                    vm = session.get(VM, notice.vm_id)
                    owner = vm.owner.name if vm is not None else None
                    what = f"the syslog channel of VM {vm.name if vm else notice.vm_id}"
                else:
                    what = f"syslog sender {notice.peer} ({notice.channel})"
                record_event(
                    session, EventType.system, Severity.warning,
                    f"{what} floods the SOC: lines beyond {notice.rate:g} a second or "
                    f"{notice.queue_size} waiting are dropped until it calms down",
                    user_name=owner, vm_id=notice.vm_id, source=_valid_ip(notice.peer),
                    action="syslog_flood", channel=notice.channel, queue_size=notice.queue_size,
                    rate=notice.rate, **({"peer": notice.peer} if notice.peer else {}),
                )  # fmt: skip
        return len(notices)

    # -- housekeeping -----------------------------------------------------------------------

    def prune(
        self, event_max_age: timedelta, now: datetime | None = None, batch: int = 10_000
    ) -> tuple[int, int]:
        """Delete events older than ``event_max_age`` (in batches, one transaction each)
        and SSH failure counts older than ``findtime`` (they can no longer add up to a ban).
        The Hub's login failures are its own. Returns (events, failures) deleted."""
        now = now or utcnow()
        cutoff = now - event_max_age
        events = 0
        while True:
            with self.db.session() as session:
                ids = select(Event.id).where(Event.created_at < cutoff).limit(batch)
                deleted = session.execute(
                    delete(Event).where(Event.id.in_(ids)).execution_options(
                        synchronize_session=False
                    )
                ).rowcount  # fmt: skip
            events += deleted or 0
            if not deleted or deleted < batch:
                break
        with self.db.session() as session:
            failures = session.execute(
                delete(AuthFailure).where(
                    AuthFailure.scope != HUB_SCOPE,
                    AuthFailure.ts <= now - timedelta(seconds=self.policy.findtime),
                ).execution_options(synchronize_session=False)
            ).rowcount  # fmt: skip
        return events, failures or 0

    def _record_one(self, session: Session, obs: SshObservation) -> int:
        ev = obs.event
        vm = self._resolve_vm(session, obs)
        if vm is None:
            return self._record_unattributed(session, obs)
        source = _valid_ip(ev.source)
        vm_id = vm.id
        owner = vm.owner.name
        target = f"VM {vm.name}"
        where = {"vm_name": vm.name}
        details: dict[str, Any] = {
            "action": f"ssh_{ev.kind.value}",
            "server": ev.server,
            "login": ev.user,
            "method": ev.method,
            "client_port": ev.port,
            "channel": obs.channel,
            "hostname": ev.hostname,
            "peer": obs.peer,
            "counted": ev.counts and source is not None,
            "fails": ev.fails,
            "reason": ev.reason,
            "key": ev.key,
        }
        scope = f"vm:{vm_id}"
        outcome = None
        if details["counted"]:
            assert source is not None
            outcome = record_failure(session, self.policy, scope, source, ev.user, obs.received_at)
            details["failures_in_window"] = outcome.failures_in_window
        elif ev.kind is SshEventKind.accepted and source is not None:
            ban = active_ban(session, scope, source, obs.received_at)
            if ban is not None:
                details["source_banned_until"] = ban.banned_until.isoformat()
        message = _SSH_MESSAGES[ev.kind].format(
            target=target, user=ev.user or "?", source=source or "an unknown address",
            method=ev.method or "?",
        )  # fmt: skip
        record_event(
            session, EventType.security, Severity(ev.severity), message,
            user_name=owner, vm_id=vm_id, source=source,
            **{k: v for k, v in details.items() if v is not None},
        )  # fmt: skip
        if outcome is None or not outcome.newly_banned:
            return 1
        assert outcome.banned_until is not None and source is not None
        duration = self.policy.duration(outcome.ban_count).total_seconds()
        # Inside a lab the attacker has an address of its own on the segment: the target's
        # guest refuses it (a local UNIX socket write, so it is fine inside the transaction).
        enforced = self.enforcer is not None and self.enforcer(vm_id, source)
        note = (
            "the address is refused inside the VM (pushed through its control port)"
            if enforced
            else NOT_ENFORCED
        )
        record_event(
            session, EventType.security, Severity.critical,
            f"SSH brute force on {target} from {source}: {outcome.failures_in_window} "
            f"failures within {self.policy.findtime:g} s; ban #{outcome.ban_count} of "
            f"{duration:g} s until {outcome.banned_until.isoformat(timespec='seconds')} "
            + ("(enforced inside the VM)" if enforced else "(recorded, not enforced)"),
            user_name=owner, vm_id=vm_id, source=source, action="ssh_bruteforce", scope=scope,
            failures=outcome.failures_in_window,
            maxretry=self.policy.maxretry, findtime=self.policy.findtime,
            ban_count=outcome.ban_count, bantime=duration,
            banned_until=outcome.banned_until.isoformat(), enforced=enforced,
            enforcement_note=note, **where,
        )  # fmt: skip
        return 2


_CURSOR_FIELDS = ("severity", "type", "vm_id", "since_id", "before_id")
