"""The SOC's event log: every action worth knowing about becomes an ``events`` row."""

from __future__ import annotations

import enum
import logging
from typing import Any

from sqlalchemy.orm import Session

from twarga_lab.db.models import Event

log = logging.getLogger("twarga_lab.events")


class EventType(enum.StrEnum):
    vm = "vm"
    auth = "auth"
    system = "system"
    security = "security"


class Severity(enum.StrEnum):
    info = "info"
    warning = "warning"
    critical = "critical"


def record_event(
    session: Session,
    type: EventType,
    severity: Severity,
    message: str,
    *,
    user_name: str | None = None,
    vm_id: int | None = None,
    source: str | None = None,
    **details: Any,
) -> Event:
    """Add one event to ``session`` (committed with the caller's transaction)."""
    event = Event(
        type=type.value,
        severity=severity.value,
        message=message,
        user_name=user_name,
        vm_id=vm_id,
        source=source,
        details=details,
    )
    session.add(event)
    log.log(
        logging.WARNING if severity != Severity.info else logging.INFO,
        "[%s/%s] %s",
        type.value,
        severity.value,
        message,
    )
    return event
