"""Users (by Jupyter/Hub name), their quotas and their credit balance."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from traitlets import Float, Int
from traitlets.config import LoggingConfigurable

from twarga_lab.db import Database
from twarga_lab.db.models import VM, CreditEntry, Quota, User, VMStatus, utcnow
from twarga_lab.errors import NotFound, TwargaError
from twarga_lab.services import Identity
from twarga_lab.services.events import EventType, Severity, record_event

if TYPE_CHECKING:  # the schemas read MILLI from here
    from twarga_lab.schemas import SetSSHKey
    from twarga_lab.virt.backend import HypervisorBackend

MILLI = 1000
# VMs in these states hold resources against the user's quota.
LIVE_STATUSES = tuple(s for s in VMStatus if s is not VMStatus.destroyed)


@dataclass(frozen=True)
class EffectiveQuota:
    max_vms: int
    max_ram_mb: int
    max_cpu: int | None
    max_disk_gb: int | None

    def to_json(self) -> dict[str, int | None]:
        return {
            "max_vms": self.max_vms,
            "max_ram_mb": self.max_ram_mb,
            "max_cpu": self.max_cpu,
            "max_disk_gb": self.max_disk_gb,
        }


@dataclass(frozen=True)
class Usage:
    vms: int
    ram_mb: int
    cpu: int
    disk_gb: int
    # Each snapshot counts as its VM's disk size (the most it can hold).
    snapshot_disk_gb: int = 0

    @property
    def total_disk_gb(self) -> int:
        """What counts against ``max_disk_gb``: the VMs' disks and their snapshots."""
        return self.disk_gb + self.snapshot_disk_gb

    def to_json(self) -> dict[str, int]:
        return {
            "vms": self.vms,
            "ram_mb": self.ram_mb,
            "cpu": self.cpu,
            "disk_gb": self.disk_gb,
            "snapshot_disk_gb": self.snapshot_disk_gb,
        }


@dataclass(frozen=True)
class HeldSnapshot:
    """One snapshot of a live VM, as the quota and the credit meter count it."""

    owner_id: int
    vm_id: int
    vm_name: str
    name: str
    disk_gb: int
    created_at: datetime


def lock_user(session: Session, user_id: int) -> None:
    """Serialise this transaction with every other one that locks the same user.

    An UPDATE as the transaction's first write takes PostgreSQL's row lock, or SQLite's
    database write lock, until commit; parallel quota checks and ledger writes queue here.
    """
    session.execute(
        update(User).where(User.id == user_id).values(lock_version=User.lock_version + 1)
    )


def balance_milli(session: Session, user_id: int) -> int:
    """The user's balance in thousandths of a credit: the last ledger row's balance."""
    last = session.scalar(
        select(CreditEntry.balance_after_milli)
        .where(CreditEntry.user_id == user_id)
        .order_by(CreditEntry.id.desc())
        .limit(1)
    )
    return int(last or 0)


def add_credit_entry(
    session: Session, user_id: int, amount_milli: int, reason: str, actor: str
) -> CreditEntry:
    """Append a ledger row; the caller must hold :func:`lock_user` for this user."""
    entry = CreditEntry(
        user_id=user_id,
        amount_milli=amount_milli,
        balance_after_milli=balance_milli(session, user_id) + amount_milli,
        reason=reason,
        actor=actor,
    )
    session.add(entry)
    session.flush()
    return entry


def usage(session: Session, user_id: int) -> Usage:
    """What the user's live VMs hold."""
    row = session.execute(
        select(
            func.count(VM.id),
            func.coalesce(func.sum(VM.ram_mb), 0),
            func.coalesce(func.sum(VM.cpu), 0),
            func.coalesce(func.sum(VM.disk_gb), 0),
        ).where(VM.owner_id == user_id, VM.status.in_(LIVE_STATUSES))
    ).one()
    return Usage(vms=row[0], ram_mb=int(row[1]), cpu=int(row[2]), disk_gb=int(row[3]))


def usage_by_user(session: Session) -> dict[int, Usage]:
    """What every user's live VMs hold, in one grouped query (users without VMs absent)."""
    rows = session.execute(
        select(
            VM.owner_id,
            func.count(VM.id),
            func.coalesce(func.sum(VM.ram_mb), 0),
            func.coalesce(func.sum(VM.cpu), 0),
            func.coalesce(func.sum(VM.disk_gb), 0),
        )
        .where(VM.status.in_(LIVE_STATUSES))
        .group_by(VM.owner_id)
    )
    return {
        owner: Usage(vms=count, ram_mb=int(ram), cpu=int(cpu), disk_gb=int(disk))
        for owner, count, ram, cpu, disk in rows
    }


def held_snapshots(
    session: Session, backend: HypervisorBackend, user_id: int | None = None
) -> list[HeldSnapshot]:
    """The snapshots of the live VMs (of ``user_id``, or everyone's), asked of libvirt.

    A domain libvirt no longer knows (or cannot list) holds none."""
    query = select(VM.id, VM.owner_id, VM.name, VM.domain_name, VM.disk_gb).where(
        VM.status.in_(LIVE_STATUSES), VM.domain_name.is_not(None)
    )
    if user_id is not None:
        query = query.where(VM.owner_id == user_id)
    held = []
    for vm_id, owner_id, vm_name, domain, disk_gb in session.execute(query).all():
        if not domain:
            continue
        try:
            found = backend.snapshots(domain)
        except TwargaError:
            continue
        held.extend(
            HeldSnapshot(owner_id, vm_id, vm_name, s.name, int(disk_gb), s.created_at)
            for s in found
        )
    return held


def snapshot_disk_gb_by_user(held: list[HeldSnapshot]) -> dict[int, int]:
    """GB the snapshots count for, per owner."""
    total: dict[int, int] = {}
    for snapshot in held:
        total[snapshot.owner_id] = total.get(snapshot.owner_id, 0) + snapshot.disk_gb
    return total


class UserService(LoggingConfigurable):
    """Creates users on first sight (with their starting credits) and reports on them."""

    starting_credits = Float(1000.0, help="Credits every new user starts with.").tag(config=True)
    max_vms = Int(5, help="Default quota: VMs per user (destroyed ones not counted).").tag(
        config=True
    )
    max_ram_mb = Int(8192, help="Default quota: total RAM of a user's VMs, in MB.").tag(config=True)

    def __init__(
        self, db: Database, backend: HypervisorBackend | None = None, **kwargs: Any
    ) -> None:
        """``backend`` lists the VMs' snapshots (they count in the disk usage); without
        one (some unit tests) snapshots count for nothing."""
        super().__init__(**kwargs)
        self.db = db
        self.backend = backend
        self._known: dict[str, int] = {}

    def usage(self, session: Session, user_id: int) -> Usage:
        """What the user's live VMs hold, their snapshots' GB included."""
        used = usage(session, user_id)
        if self.backend is None:
            return used
        gb = sum(s.disk_gb for s in held_snapshots(session, self.backend, user_id))
        return replace(used, snapshot_disk_gb=gb)

    def usage_by_user(self, session: Session) -> dict[int, Usage]:
        """:func:`usage_by_user` with every user's snapshots' GB."""
        usages = usage_by_user(session)
        if self.backend is None:
            return usages
        for owner, gb in snapshot_disk_gb_by_user(held_snapshots(session, self.backend)).items():
            if owner in usages:
                usages[owner] = replace(usages[owner], snapshot_disk_gb=gb)
        return usages

    @property
    def starting_credits_milli(self) -> int:
        return round(self.starting_credits * MILLI)

    def ensure(self, name: str) -> int:
        """The id of user ``name``, created with their starting credits on first sight."""
        known = self._known.get(name)
        if known is not None:
            return known
        with self.db.session() as session:
            user_id = session.scalar(select(User.id).where(User.name == name))
        if user_id is None:
            try:
                with self.db.session() as session:
                    user = User(name=name, last_seen=utcnow())
                    session.add(user)
                    session.flush()
                    add_credit_entry(
                        session, user.id, self.starting_credits_milli, "starting credits", "system"
                    )
                    record_event(
                        session,
                        EventType.system,
                        Severity.info,
                        f"new user {name} with {self.starting_credits_milli / MILLI:g} credits",
                        user_name=name,
                    )
                    user_id = user.id
            except IntegrityError:
                # Another request created them at the same moment.
                with self.db.session() as session:
                    user_id = session.scalar(select(User.id).where(User.name == name))
        assert user_id is not None
        self._known[name] = user_id
        return user_id

    def effective_quota(self, session: Session, user_id: int) -> EffectiveQuota:
        """The user's limits: their own quota row over the defaults."""
        return self.quota_from_row(session.get(Quota, user_id))

    def quota_from_row(self, row: Quota | None) -> EffectiveQuota:
        """Limits from a user's quota row (or None) over the defaults (no default limit
        on CPU and disk)."""

        def pick(own: int | None, default: int | None) -> int | None:
            return own if own is not None else default

        return EffectiveQuota(
            max_vms=pick(row.max_vms if row else None, self.max_vms) or 0,
            max_ram_mb=pick(row.max_ram_mb if row else None, self.max_ram_mb) or 0,
            max_cpu=row.max_cpu if row else None,
            max_disk_gb=row.max_disk_gb if row else None,
        )

    def me(self, identity: Identity) -> dict[str, Any]:
        """What ``GET /me`` shows: name, admin, credits, quota and usage."""
        user_id = self.ensure(identity.name)
        with self.db.session() as session:
            user = session.get(User, user_id)
            if user is None:
                raise NotFound(f"user {identity.name} does not exist", "no_user")
            return {
                "name": user.name,
                "admin": identity.admin,
                "credits": balance_milli(session, user_id) / MILLI,
                "quota": self.effective_quota(session, user_id).to_json(),
                "usage": self.usage(session, user_id).to_json(),
                "ssh_public_key": user.ssh_public_key,
                "created_at": user.created_at.isoformat(),
            }

    def set_ssh_key(self, identity: Identity, request: SetSSHKey) -> dict[str, Any]:
        """Store the user's SSH public key (installed into the VMs they create next)."""
        user_id = self.ensure(identity.name)
        key = request.ssh_public_key
        with self.db.session() as session:
            session.execute(update(User).where(User.id == user_id).values(ssh_public_key=key))
        return self.me(identity)
