"""Twarga Lab's data layer: SQLAlchemy 2 models, sessions and alembic migrations."""

from twarga_lab.db.models import (
    VM,
    Base,
    CreditEntry,
    Event,
    MetricChunk,
    MetricSeries,
    Quota,
    User,
    VMStatus,
)
from twarga_lab.db.session import Database, upgrade_db

__all__ = [
    "VM",
    "Base",
    "CreditEntry",
    "Database",
    "Event",
    "MetricChunk",
    "MetricSeries",
    "Quota",
    "User",
    "VMStatus",
    "upgrade_db",
]
