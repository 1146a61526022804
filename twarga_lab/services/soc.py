"""The SOC: the security-event log as users and admins see it, statistics, exports and bans,
and the recording of SSH activity inside guests with brute-force detection.

Visibility: a user sees the events about them (``user_name``) and about their VMs; an admin
sees everything. Statistics are for admins.

Brute force follows fail2ban (``services.bans``): ``maxretry`` failures from one source
against one VM (scope ``vm:<id>``) within ``findtime`` seconds raise one critical event and
a ban of ``bantime`` seconds that doubles for repeat offenders. Under QEMU user networking
every SSH client reaches the guest from the same address (10.0.2.2, the host's end of the
forward), so the ban is recorded but not enforced; events say so (``"enforced": false``).
"""

from __future__ import annotations

import asyncio
import csv
import io
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from twarga_lab.db import Database
from twarga_lab.db.models import VM, Ban, Event, User, VMStatus, utcnow
from twarga_lab.errors import Forbidden, InvalidRequest, ValidationFailed
from twarga_lab.services import Identity
from twarga_lab.services.bans import BanPolicy, active_ban, record_failure
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.sshlog import SshEvent, SshEventKind

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class EventQuery:
    """Filters and paging of an event listing or export."""

    limit: int = 100
    severity: str | None = None
    type: str | None = None
    vm_id: int | None = None
    since_id: int | None = None  # live tail: ids above, oldest first
    before_id: int | None = None  # older pages: ids below, newest first

    @classmethod
    def from_params(
        cls, params: Mapping[str, str | None], *, default_limit: int = 100, max_limit: int = 1000
    ) -> EventQuery:
        """Parse query-string values; 400 for a non-number, 422 for a value out of range."""

        def number(name: str) -> int | None:
            raw = params.get(name)
            if raw is None or raw == "":
                return None
            try:
                return int(raw)
            except ValueError:
                raise InvalidRequest(f"{name!r} must be an integer", "bad_type") from None

        limit = number("limit")
        limit = default_limit if limit is None else limit
        if not 1 <= limit <= max_limit:
            raise ValidationFailed(
                f"limit must be between 1 and {max_limit}", field="limit", reason="out_of_range"
            )
        severity = params.get("severity") or None
        if severity is not None and severity not in Severity.__members__:
            raise ValidationFailed(
                f"severity must be one of {', '.join(Severity)}", field="severity",
                reason="unknown_severity",
            )  # fmt: skip
        type_ = params.get("type") or None
        if type_ is not None and type_ not in EventType.__members__:
            raise ValidationFailed(
                f"type must be one of {', '.join(EventType)}", field="type",
                reason="unknown_type",
            )  # fmt: skip
        since_id, before_id = number("since_id"), number("before_id")
        if since_id is not None and before_id is not None:
            raise ValidationFailed(
                "since_id and before_id cannot be combined", field="since_id", reason="conflict"
            )
        return cls(limit, severity, type_, number("vm_id"), since_id, before_id)


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


def events_to_csv(events: list[dict[str, Any]], *, header: bool) -> str:
    """CSV rows of ``events`` (``details`` as a JSON object in one cell)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(EXPORT_COLUMNS)
    for event in events:
        row = dict(event, details=json.dumps(event["details"], sort_keys=True, default=str))
        writer.writerow(["" if row[c] is None else row[c] for c in EXPORT_COLUMNS])
    return out.getvalue()


def events_to_jsonl(events: list[dict[str, Any]]) -> str:
    """One JSON object per line."""
    return "".join(json.dumps(e, sort_keys=True, default=str) + "\n" for e in events)


@dataclass(frozen=True)
class SshObservation:
    """An SSH event seen in a log stream, and which stream it came through."""

    event: SshEvent
    channel: str  # virtio (the VM's own channel), udp or tcp
    vm_id: int | None = None  # known for the VM's channel
    peer: str | None = None  # sender address on the network receiver
    received_at: datetime = field(default_factory=utcnow)


def _valid_ip(source: str | None) -> str | None:
    if not source:
        return None
    try:
        return str(ipaddress.ip_address(source))
    except ValueError:
        return None


class SocService:
    """Event queries for the API, and SSH activity from guests into events and bans."""

    def __init__(self, db: Database, policy: BanPolicy | None = None) -> None:
        self.db = db
        self.policy = policy or BanPolicy()

    # -- visibility -------------------------------------------------------------------

    @staticmethod
    def _visible(stmt: Select[Any], identity: Identity) -> Select[Any]:
        if identity.admin:
            return stmt
        own_vms = select(VM.id).join(User, VM.owner_id == User.id).where(User.name == identity.name)
        return stmt.where(or_(Event.user_name == identity.name, Event.vm_id.in_(own_vms)))

    def _filtered(self, identity: Identity, query: EventQuery) -> Select[Any]:
        stmt = self._visible(select(Event), identity)
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

    # -- listing and export -------------------------------------------------------------

    def list_events(self, identity: Identity, query: EventQuery) -> list[dict[str, Any]]:
        """Events the caller may see: newest first, or after ``since_id`` oldest first."""
        with self.db.session() as session:
            rows = session.scalars(self._filtered(identity, query).limit(query.limit))
            return [event_to_json(e) for e in rows]

    async def export(
        self, identity: Identity, query: EventQuery, fmt: str, page_size: int = 1000
    ) -> AsyncIterator[str]:
        """The events of ``list_events`` (up to ``query.limit``) as CSV or JSON Lines, in
        chunks of one page each, read off the event loop."""
        remaining = query.limit
        cursor = query
        first = True
        while remaining > 0:
            size = min(page_size, remaining)
            page_query = EventQuery(size, *(getattr(cursor, f) for f in _CURSOR_FIELDS))
            page = await asyncio.to_thread(self.list_events, identity, page_query)
            if fmt == "csv":
                yield events_to_csv(page, header=first)
            else:
                yield events_to_jsonl(page)
            first = False
            remaining -= len(page)
            if len(page) < size:
                return
            last = page[-1]["id"]
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

    def _resolve_vm(self, session: Session, obs: SshObservation) -> tuple[VM | None, int]:
        """The VM an observation is about, and how many VMs its hostname could mean."""
        if obs.vm_id is not None:
            vm = session.get(VM, obs.vm_id)
            return (vm if vm is not None and vm.status is not VMStatus.destroyed else None), 1
        hostname = obs.event.hostname
        if not hostname:
            return None, 0
        vm = session.scalar(
            select(VM).where(VM.domain_name == hostname, VM.status != VMStatus.destroyed)
        )
        if vm is not None:
            return vm, 1
        # VM names are unique per user only: a name alone is trusted when it is unique.
        candidates = session.scalars(
            select(VM).where(VM.name == hostname, VM.status != VMStatus.destroyed).limit(2)
        ).all()
        return (candidates[0] if len(candidates) == 1 else None), len(candidates)

    def _record_one(self, session: Session, obs: SshObservation) -> int:
        ev = obs.event
        vm, matches = self._resolve_vm(session, obs)
        source = _valid_ip(ev.source)
        host = ev.hostname or obs.peer or "?"
        vm_id = vm.id if vm is not None else None
        owner = vm.owner.name if vm is not None else None
        target = f"VM {vm.name}" if vm is not None else f"host {host}"
        where = {"vm_name": vm.name} if vm is not None else {"hostname": host}
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
        if vm is None and obs.vm_id is None and matches > 1:
            details["ambiguous_hostname"] = matches
        scope = f"vm:{vm_id}" if vm_id is not None else f"host:{host}"
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
        record_event(
            session, EventType.security, Severity.critical,
            f"SSH brute force on {target} from {source}: {outcome.failures_in_window} "
            f"failures within {self.policy.findtime:g} s; ban #{outcome.ban_count} of "
            f"{duration:g} s until {outcome.banned_until.isoformat(timespec='seconds')} "
            "(recorded, not enforced)",
            user_name=owner, vm_id=vm_id, source=source, action="ssh_bruteforce", scope=scope,
            failures=outcome.failures_in_window,
            maxretry=self.policy.maxretry, findtime=self.policy.findtime,
            ban_count=outcome.ban_count, bantime=duration,
            banned_until=outcome.banned_until.isoformat(), enforced=False,
            enforcement_note=NOT_ENFORCED, **where,
        )  # fmt: skip
        return 2


_CURSOR_FIELDS = ("severity", "type", "vm_id", "since_id", "before_id")
