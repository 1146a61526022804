"""Credits: metering of running VMs and of snapshots, admin grants, quotas, and the
users' overview.

Every change of a balance is a ``credit_ledger`` row written under the user's lock
(:func:`~twarga_lab.services.users.lock_user`), so concurrent metering and grants queue
instead of losing rows, and the balance (the last row's ``balance_after``) never goes
below zero: metering charges at most what is left.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from traitlets import Float
from traitlets.config import LoggingConfigurable

from twarga_lab.db import Database, models
from twarga_lab.db.models import VM, Account, CreditEntry, Quota, User, VMStatus
from twarga_lab.errors import NotFound, ValidationFailed
from twarga_lab.services import Identity
from twarga_lab.services.background import cancel_and_wait
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.users import (
    MILLI,
    HeldSnapshot,
    Usage,
    UserService,
    add_credit_entry,
    balance_milli,
    held_snapshots,
    lock_user,
)

if TYPE_CHECKING:
    from twarga_lab.schemas import GrantCredits, SetQuota

log = logging.getLogger(__name__)
QUOTA_FIELDS = ("max_vms", "max_ram_mb", "max_cpu", "max_disk_gb")


def utcnow() -> datetime:
    """The meter's clock (tests patch this)."""
    return models.utcnow()


def unmetered_seconds(vm: VM, now: datetime) -> float:
    """Seconds of running time of ``vm`` not yet charged (since the later of its last
    metering and its last start)."""
    since = max(t for t in (vm.metered_until, vm.started_at, vm.created_at) if t)
    return (now - since).total_seconds()


def has_credits(session: Session, user_id: int) -> bool:
    """Whether the user has credits left, so may create or start a VM (a balance of
    exactly zero is none: metering never takes a balance below zero)."""
    return balance_milli(session, user_id) > 0


@dataclass
class MeterReport:
    """One metering pass: charges per user, and who ran out."""

    charged_milli: dict[str, int] = field(default_factory=dict)
    exhausted: list[str] = field(default_factory=list)


class CreditService(LoggingConfigurable):
    """Metering, grants, quotas and the admin's view of users."""

    per_vcpu_hour = Float(
        10.0, help="Credits a running VM costs per vCPU and hour (charged every minute)."
    ).tag(config=True)
    per_gb_ram_hour = Float(
        5.0, help="Credits a running VM costs per GB of RAM and hour (charged every minute)."
    ).tag(config=True)
    per_gb_snapshot_hour = Float(
        0.1,
        help="Credits a snapshot costs per GB and hour while it exists (charged every "
        "interval); a snapshot counts as its VM's disk size.",
    ).tag(config=True)
    interval = Float(
        60.0, help="Seconds between two charges of running VMs; at zero credits they stop."
    ).tag(config=True)

    def __init__(self, db: Database, users: UserService, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.db = db
        self.users = users
        # Snapshots are charged for their time since the later of their creation and the
        # previous metering pass (time the server was down is not charged).
        self.snapshots_metered_until = utcnow()

    def cost_milli(self, cpu: int, ram_mb: int, seconds: float) -> int:
        """Thousandths of a credit for ``seconds`` of a VM of this size (rounded up)."""
        per_hour = cpu * self.per_vcpu_hour + ram_mb / 1024 * self.per_gb_ram_hour
        return math.ceil(per_hour * max(0.0, seconds) / 3600 * MILLI)

    def snapshot_cost_milli(self, disk_gb: int, seconds: float) -> int:
        """Thousandths of a credit for keeping a snapshot of a ``disk_gb`` VM ``seconds``
        (rounded up)."""
        return math.ceil(disk_gb * self.per_gb_snapshot_hour * max(0.0, seconds) / 3600 * MILLI)

    # -- metering -----------------------------------------------------------------------

    def meter(self, now: datetime | None = None) -> MeterReport:
        """Charge every running VM for its time since it was last metered, and every
        snapshot for its time since the previous pass."""
        now = now or utcnow()
        report = MeterReport()
        with self.db.session() as session:
            owners = session.scalars(
                select(VM.owner_id).where(VM.status == VMStatus.running).distinct()
            ).all()
            backend = self.users.backend
            snapshots = held_snapshots(session, backend) if backend is not None else []
        since, self.snapshots_metered_until = self.snapshots_metered_until, now
        held: dict[int, list[HeldSnapshot]] = {}
        for snapshot in snapshots:
            held.setdefault(snapshot.owner_id, []).append(snapshot)
        for owner_id in dict.fromkeys([*owners, *held]):
            self._meter_user(owner_id, now, report, held.get(owner_id, []), since)
        return report

    def _snapshot_charge(
        self, held: list[HeldSnapshot], now: datetime, since: datetime
    ) -> tuple[int, list[str]]:
        """The cost of ``held`` between ``since`` (or a later creation) and ``now``."""
        cost, parts = 0, []
        for snapshot in held:
            seconds = (now - max(since, snapshot.created_at)).total_seconds()
            if seconds <= 0:
                continue
            cost += self.snapshot_cost_milli(snapshot.disk_gb, seconds)
            parts.append(
                f"{snapshot.vm_name}/{snapshot.name} {snapshot.disk_gb} GB {seconds:.0f} s"
            )
        return cost, parts

    def _meter_user(
        self,
        owner_id: int,
        now: datetime,
        report: MeterReport,
        held: list[HeldSnapshot] | None = None,
        since: datetime | None = None,
    ) -> None:
        with self.db.session() as session:
            lock_user(session, owner_id)
            owner = session.get(User, owner_id)
            assert owner is not None
            vms = session.scalars(
                select(VM).where(VM.owner_id == owner_id, VM.status == VMStatus.running)
            ).all()
            cost = 0
            parts = []
            for vm in vms:
                seconds = unmetered_seconds(vm, now)
                if seconds <= 0:
                    continue
                cost += self.cost_milli(vm.cpu, vm.ram_mb, seconds)
                parts.append(f"{vm.name} {seconds:.0f} s")
                vm.metered_until = now
            snapshot_cost, snapshot_parts = self._snapshot_charge(held or [], now, since or now)
            if cost == 0 and snapshot_cost == 0:
                return
            balance = balance_milli(session, owner_id)
            # VMs first, then snapshots, each at most what is left (never below zero).
            charge = min(cost, balance)
            if charge > 0:
                add_credit_entry(
                    session, owner_id, -charge, "VM usage: " + ", ".join(parts), "meter"
                )
            snapshot_charge = min(snapshot_cost, balance - charge)
            if snapshot_charge > 0:
                add_credit_entry(
                    session, owner_id, -snapshot_charge,
                    "snapshot storage: " + ", ".join(snapshot_parts), "meter",
                )  # fmt: skip
            vm_cost = cost
            cost, charge = cost + snapshot_cost, charge + snapshot_charge
            if charge > 0:
                report.charged_milli[owner.name] = charge
            # Snapshots alone warn once, as they take the last credits, not every pass.
            if balance - charge <= 0 and (vm_cost > 0 or balance > 0):
                report.exhausted.append(owner.name)
                record_event(
                    session, EventType.system, Severity.warning,
                    f"{owner.name} has no credits left: their running VMs are being stopped",
                    user_name=owner.name, action="credits_exhausted",
                    unpaid=(cost - charge) / MILLI,
                )  # fmt: skip

    def settle(self, session: Session, vm: VM, now: datetime | None = None) -> int:
        """Bill ``vm``'s running time since the last metering pass, to the second, as it
        stops or is destroyed (in the caller's transaction); returns the charge in
        thousandths of a credit. Without this, the minutes between the last tick and a stop
        would never be paid for."""
        now = now or utcnow()
        seconds = unmetered_seconds(vm, now)
        if seconds <= 0:
            return 0
        vm.metered_until = now
        lock_user(session, vm.owner_id)
        cost = self.cost_milli(vm.cpu, vm.ram_mb, seconds)
        charge = min(cost, balance_milli(session, vm.owner_id))
        if charge > 0:
            add_credit_entry(
                session, vm.owner_id, -charge, f"VM usage: {vm.name} {seconds:.0f} s", "meter"
            )
        return charge

    # -- admin ----------------------------------------------------------------------------

    def _user_id(self, name: str) -> int:
        with self.db.session() as session:
            user_id = session.scalar(select(User.id).where(User.name == name))
            known = user_id is not None or session.get(Account, name) is not None
        if user_id is None:
            if not known:
                raise NotFound(f"no user named {name}", "no_user")
            user_id = self.users.ensure(name)
        return user_id

    def grant(self, actor: Identity, name: str, request: GrantCredits) -> float:
        """Add (or, negative, take) credits; returns the new balance."""
        amount, amount_milli, reason = request.amount, request.amount_milli, request.reason
        user_id = self._user_id(name)
        with self.db.session() as session:
            lock_user(session, user_id)
            balance = balance_milli(session, user_id)
            if balance + amount_milli < 0:
                raise ValidationFailed(
                    f"{name} has {balance / MILLI:g} credits; taking {-amount:g} would make "
                    "the balance negative",
                    field="amount",
                    reason="insufficient_credits",
                )
            entry = add_credit_entry(session, user_id, amount_milli, reason, actor.name)
            record_event(
                session, EventType.system, Severity.info,
                f"{actor.name} {'granted' if amount > 0 else 'took'} {abs(amount):g} credits "
                f"{'to' if amount > 0 else 'from'} {name}: {reason}",
                user_name=name, action="credits", actor=actor.name, amount=amount,
                balance=entry.balance_after_milli / MILLI,
            )  # fmt: skip
            return entry.balance_after_milli / MILLI

    def set_quota(self, actor: Identity, name: str, request: SetQuota) -> dict:
        """Set the per-user limits the request names; ``None`` returns one to the default."""
        changes = request.changes()
        user_id = self._user_id(name)
        with self.db.session() as session:
            lock_user(session, user_id)
            quota = session.get(Quota, user_id)
            if quota is None:
                quota = Quota(user_id=user_id)
                session.add(quota)
            for key, value in changes.items():
                setattr(quota, key, value)
            session.flush()
            effective = self.users.effective_quota(session, user_id).to_json()
            record_event(
                session, EventType.system, Severity.info,
                f"{actor.name} changed the quota of {name}",
                user_name=name, action="quota", actor=actor.name, changes=changes,
                quota=effective,
            )  # fmt: skip
            return {"name": name, "quota": effective}

    def ledger(self, name: str, limit: int = 100) -> list[dict[str, Any]]:
        """The user's latest ledger rows, newest first."""
        user_id = self._user_id(name)
        with self.db.session() as session:
            rows = session.scalars(
                select(CreditEntry)
                .where(CreditEntry.user_id == user_id)
                .order_by(CreditEntry.id.desc())
                .limit(limit)
            ).all()
            return [
                {
                    "id": r.id,
                    "amount": r.amount_milli / MILLI,
                    "balance_after": r.balance_after_milli / MILLI,
                    "reason": r.reason,
                    "actor": r.actor,
                    "created_at": r.created_at.isoformat(),
                }
                for r in rows
            ]

    def list_users(self) -> list[dict[str, Any]]:
        """Every user Twarga knows (Hub accounts too): credits, VM count, quota, active."""
        with self.db.session() as session:
            names = set(session.scalars(select(User.name))) | set(
                session.scalars(select(Account.name))
            )
        for name in names:
            self.users.ensure(name)
        result = []
        with self.db.session() as session:
            accounts = {a.name: a for a in session.scalars(select(Account))}
            last_ids = (
                select(CreditEntry.user_id, func.max(CreditEntry.id).label("last_id"))
                .group_by(CreditEntry.user_id)
                .subquery()
            )
            balances = dict(
                session.execute(
                    select(CreditEntry.user_id, CreditEntry.balance_after_milli).join(
                        last_ids, CreditEntry.id == last_ids.c.last_id
                    )
                ).all()
            )
            quotas = {q.user_id: q for q in session.scalars(select(Quota))}
            usages = self.users.usage_by_user(session)  # snapshots' GB included
            nothing = Usage(vms=0, ram_mb=0, cpu=0, disk_gb=0)
            for user in session.scalars(select(User).order_by(User.name)):
                account = accounts.get(user.name)
                used = usages.get(user.id, nothing)
                result.append(
                    {
                        "name": user.name,
                        "credits": balances.get(user.id, 0) / MILLI,
                        "vm_count": used.vms,
                        "usage": used.to_json(),
                        "quota": self.users.quota_from_row(quotas.get(user.id)).to_json(),
                        "active": account is None or (account.approved and not account.disabled),
                        "approved": account.approved if account else True,
                        "created_at": user.created_at.isoformat(),
                        "last_seen": user.last_seen.isoformat() if user.last_seen else None,
                    }
                )
        return result


class CreditMeter:
    """Meters every ``CreditService.interval`` seconds in a worker thread; stops VMs of
    users at zero."""

    def __init__(self, credits: CreditService, vms: Any) -> None:
        self.credits = credits
        self.vms = vms
        self._task: asyncio.Task[None] | None = None

    @property
    def interval(self) -> float:
        return self.credits.interval

    async def tick(self) -> MeterReport:
        """One metering pass, then stop the VMs of everyone who ran out."""
        report = await asyncio.to_thread(self.credits.meter)
        for name in report.exhausted:
            await self.vms.stop_all_of(name, "credits exhausted")
        return report

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception:
                log.exception("credit metering failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
