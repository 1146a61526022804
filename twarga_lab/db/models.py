"""SQLAlchemy 2 models. Every schema change comes with an alembic migration."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints keep migrations portable between SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Now, timezone-aware. Module level so tests can patch the clock."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC, on every database alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class VMStatus(enum.StrEnum):
    """Twarga's own view of a VM, independent of libvirt's state numbers."""

    pending = "pending"  # accepted, disk and domain being prepared
    starting = "starting"
    running = "running"
    paused = "paused"
    stopping = "stopping"
    stopped = "stopped"
    error = "error"
    unknown = "unknown"  # its host does not answer; reconciled when it is back
    destroying = "destroying"
    destroyed = "destroyed"


class User(Base):
    """A person, keyed by their Jupyter/Hub user name."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    ssh_public_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Bumped by every operation that must see the user's VMs and credits alone: the UPDATE
    # takes the row (PostgreSQL) or the database (SQLite) write lock first, so quota checks
    # of parallel creates run one after another.
    lock_version: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))

    vms: Mapped[list[VM]] = relationship(back_populates="owner")
    quota: Mapped[Quota | None] = relationship(back_populates="user", uselist=False)


class Quota(Base):
    """Per-user overrides of the default limits; a NULL column means the default."""

    __tablename__ = "quotas"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    max_vms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_ram_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_cpu: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_disk_gb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    user: Mapped[User] = relationship(back_populates="quota")


class CreditEntry(Base):
    """One change of a user's credits. The ledger is the truth; balances derive from it.

    Amounts are stored in thousandths of a credit so that per-minute metering stays exact.
    """

    __tablename__ = "credit_ledger"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    amount_milli: Mapped[int] = mapped_column(BigInteger)
    balance_after_milli: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(255))
    actor: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_credit_ledger_user_id_id", "user_id", "id"),)


class VM(Base):
    """A virtual machine owned by a user; its libvirt domain is ``domain_name``."""

    __tablename__ = "vms"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    domain_name: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    image: Mapped[str] = mapped_column(String(255))
    os_type: Mapped[str] = mapped_column(String(64))
    ram_mb: Mapped[int] = mapped_column(Integer)
    cpu: Mapped[int] = mapped_column(Integer)
    disk_gb: Mapped[int] = mapped_column(Integer)
    status: Mapped[VMStatus] = mapped_column(
        Enum(VMStatus, name="vm_status", native_enum=False, length=16), default=VMStatus.pending
    )
    status_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    ssh_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The tiny image's root password, for the owner to read back; the guest gets a hash.
    root_password: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ip_address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Credits are charged for running time up to here; the meter picks up from it.
    metered_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    destroyed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # A lab's VM: which lab, and which machine of its template (``web``, ``web-2``).
    lab_id: Mapped[int | None] = mapped_column(
        ForeignKey("labs.id", ondelete="SET NULL"), nullable=True, index=True
    )
    lab_machine: Mapped[str | None] = mapped_column(String(63), nullable=True)
    # The hypervisor host (a name of ``TwargaLabApp.hosts``) its domain is defined on.
    host: Mapped[str | None] = mapped_column(String(63), nullable=True, index=True)

    owner: Mapped[User] = relationship(back_populates="vms")
    lab: Mapped[Lab | None] = relationship(back_populates="vms")
    nics: Mapped[list[LabNIC]] = relationship(
        back_populates="vm", cascade="all, delete-orphan", order_by="LabNIC.id"
    )

    __table_args__ = (
        # Names are unique per user among VMs that still exist; destroyed rows stay for history.
        Index(
            "uq_vms_owner_live_name",
            "owner_id",
            "name",
            unique=True,
            sqlite_where=text("status != 'destroyed'"),
            postgresql_where=text("status != 'destroyed'"),
        ),
        Index(
            "uq_vms_live_ssh_port",
            "ssh_port",
            unique=True,
            sqlite_where=text("status != 'destroyed'"),
            postgresql_where=text("status != 'destroyed'"),
        ),
        Index("ix_vms_owner_id_status", "owner_id", "status"),
    )


class HypervisorHost(Base):
    """What an admin decided about a host of ``TwargaLabApp.hosts`` (its URI and capacity
    come from the configuration and from libvirt, not from here)."""

    __tablename__ = "hypervisor_hosts"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Event(Base):
    """A security/operations event (the SOC's timeline)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    type: Mapped[str] = mapped_column(String(16))  # vm, auth, system, security
    severity: Mapped[str] = mapped_column(String(16))  # info, warning, critical
    message: Mapped[str] = mapped_column(Text)
    user_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    vm_id: Mapped[int | None] = mapped_column(
        ForeignKey("vms.id", ondelete="SET NULL"), nullable=True
    )
    source: Mapped[str | None] = mapped_column(String(255), nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    __table_args__ = (
        Index("ix_events_user_name_id", "user_name", "id"),
        Index("ix_events_vm_id_id", "vm_id", "id"),
        Index("ix_events_created_at", "created_at"),
    )


class MetricSeries(Base):
    """One time series: a metric of the host (``entity_id`` 0) or of one VM."""

    __tablename__ = "metric_series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    entity: Mapped[str] = mapped_column(String(8))  # host or vm
    entity_id: Mapped[int] = mapped_column(Integer)  # 0 for the host, else vms.id
    metric: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        Index(
            "uq_metric_series_entity_entity_id_metric",
            "entity",
            "entity_id",
            "metric",
            unique=True,
        ),
    )


class MetricChunk(Base):
    """The samples of one series in one time bucket, packed (``services.metric_store``).

    ``resolution`` is 0 for raw samples and 60 or 3600 for rollups; ``start`` is the bucket's
    first second (Unix time); ``data`` holds zlib-packed millisecond offsets and float32
    columns. One row per series and bucket keeps a 24-hour read to a few dozen rows.
    """

    __tablename__ = "metric_chunks"

    series_id: Mapped[int] = mapped_column(
        ForeignKey("metric_series.id", ondelete="CASCADE"), primary_key=True
    )
    resolution: Mapped[int] = mapped_column(Integer, primary_key=True)
    start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (
        # Pruning deletes by age across every series.
        Index("ix_metric_chunks_resolution_start", "resolution", "start"),
        # Rows are clustered by series and time, so a series' window is one range read.
        {"sqlite_with_rowid": False},
    )


class Account(Base):
    """A Hub login created by Twarga's sign-up authenticator."""

    __tablename__ = "accounts"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    approved: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    approved_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    last_login: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The uid of the system account Twarga created for this login (None: none yet). An
    # existing system account is reused only if it is this one.
    system_uid: Mapped[int | None] = mapped_column(Integer, nullable=True)


class AuthFailure(Base):
    """One failed authentication from ``source`` against ``scope`` (``hub`` or ``vm:<id>``)."""

    __tablename__ = "auth_failures"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    scope: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(128))
    user_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_auth_failures_scope_source_ts", "scope", "source", "ts"),
        Index("ix_auth_failures_user_name_ts", "user_name", "ts"),
    )


class Ban(Base):
    """A source banned from a scope until ``banned_until``; ``ban_count`` escalates."""

    __tablename__ = "bans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(128))
    banned_until: Mapped[datetime] = mapped_column(UTCDateTime)
    ban_count: Mapped[int] = mapped_column(Integer, default=1)
    last_banned_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("uq_bans_scope_source", "scope", "source", unique=True),)


class Deployment(Base):
    """One template handed to every member of a Hub group: each gets a lab of their own."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    group_name: Mapped[str] = mapped_column(String(255))
    template_name: Mapped[str] = mapped_column(String(63))
    template: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    labs: Mapped[list[Lab]] = relationship(back_populates="deployment", order_by="Lab.id")


class Lab(Base):
    """A set of one owner's VMs made from a template, with private networks of their own."""

    __tablename__ = "labs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    template_name: Mapped[str] = mapped_column(String(63))
    # The template as it was when the lab was made: later edits of the file change nothing.
    template: Mapped[dict[str, Any]] = mapped_column(JSON)
    deployment_id: Mapped[int | None] = mapped_column(
        ForeignKey("deployments.id", ondelete="SET NULL"), nullable=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    destroyed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    owner: Mapped[User] = relationship()
    deployment: Mapped[Deployment | None] = relationship(back_populates="labs")
    networks: Mapped[list[LabNetwork]] = relationship(
        back_populates="lab", cascade="all, delete-orphan", order_by="LabNetwork.id"
    )
    vms: Mapped[list[VM]] = relationship(back_populates="lab", order_by="VM.id")

    __table_args__ = (
        Index(
            "uq_labs_owner_live_name",
            "owner_id",
            "name",
            unique=True,
            sqlite_where=text("destroyed_at IS NULL"),
            postgresql_where=text("destroyed_at IS NULL"),
        ),
    )


class LabNetwork(Base):
    """A lab's private L2 segment: one virtual switch, no path to the host's networks."""

    __tablename__ = "lab_networks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    lab_id: Mapped[int] = mapped_column(ForeignKey("labs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(15))
    cidr: Mapped[str] = mapped_column(String(18))

    lab: Mapped[Lab] = relationship(back_populates="networks")


class LabNIC(Base):
    """A lab VM's port on one of its lab's segments, with the address the seed gives it."""

    __tablename__ = "lab_nics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    network_id: Mapped[int] = mapped_column(ForeignKey("lab_networks.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(15))
    prefix: Mapped[int] = mapped_column(Integer)
    mac: Mapped[str] = mapped_column(String(17))

    vm: Mapped[VM] = relationship(back_populates="nics")
    network: Mapped[LabNetwork] = relationship()
