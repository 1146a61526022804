"""Brute-force protection with fail2ban's semantics, kept in the database.

``maxretry`` failures from one source against one scope (``hub`` for the Hub login,
``vm:<id>`` for a VM's SSH server) within ``findtime`` seconds ban that source for
``bantime`` seconds; each further ban of the same source doubles the time (fail2ban's
``bantime.increment``). Failures and bans are rows, so they survive restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from twarga_lab.db.models import AuthFailure, Ban, utcnow


@dataclass(frozen=True)
class BanPolicy:
    """fail2ban's ``maxretry``, ``findtime`` and ``bantime`` (seconds), plus the cap."""

    maxretry: int = 5
    findtime: float = 600.0
    bantime: float = 600.0
    max_bantime: float = 7 * 24 * 3600.0

    def duration(self, ban_count: int) -> timedelta:
        """How long the ``ban_count``-th ban of a source lasts: doubling, capped."""
        seconds = min(self.bantime * 2 ** max(0, ban_count - 1), self.max_bantime)
        return timedelta(seconds=seconds)


@dataclass(frozen=True)
class FailureOutcome:
    """What one more failure did: how many are in the window, and a new ban if any."""

    failures_in_window: int
    banned_until: datetime | None = None
    ban_count: int = 0

    @property
    def newly_banned(self) -> bool:
        return self.banned_until is not None


def active_ban(
    session: Session, scope: str, source: str, now: datetime | None = None
) -> Ban | None:
    """The ban of ``source`` on ``scope`` in force at ``now``, if any."""
    now = now or utcnow()
    ban = session.scalar(select(Ban).where(Ban.scope == scope, Ban.source == source))
    if ban is not None and ban.banned_until > now:
        return ban
    return None


def record_failure(
    session: Session,
    policy: BanPolicy,
    scope: str,
    source: str,
    user_name: str | None = None,
    now: datetime | None = None,
) -> FailureOutcome:
    """Count one failure; ban the source when it reaches ``maxretry`` within ``findtime``.

    Failures that led to a ban are cleared so the next ban needs ``maxretry`` fresh ones.
    """
    now = now or utcnow()
    session.add(AuthFailure(scope=scope, source=source, user_name=user_name, ts=now))
    session.flush()
    since = now - timedelta(seconds=policy.findtime)
    count = session.scalar(
        select(func.count(AuthFailure.id)).where(
            AuthFailure.scope == scope, AuthFailure.source == source, AuthFailure.ts > since
        )
    )
    count = int(count or 0)
    if count < policy.maxretry or active_ban(session, scope, source, now) is not None:
        return FailureOutcome(failures_in_window=count)
    ban = session.scalar(select(Ban).where(Ban.scope == scope, Ban.source == source))
    if ban is None:
        ban = Ban(scope=scope, source=source, ban_count=0, banned_until=now, last_banned_at=now)
        session.add(ban)
    ban.ban_count += 1
    ban.banned_until = now + policy.duration(ban.ban_count)
    ban.last_banned_at = now
    session.execute(
        delete(AuthFailure).where(
            AuthFailure.scope == scope, AuthFailure.source == source, AuthFailure.ts <= now
        )
    )
    session.flush()
    return FailureOutcome(count, ban.banned_until, ban.ban_count)


def failures_by_user(session: Session, scope: str, user_name: str, since: datetime) -> int:
    """How many failures name ``user_name`` on ``scope`` since ``since``."""
    return int(
        session.scalar(
            select(func.count(AuthFailure.id)).where(
                AuthFailure.scope == scope,
                AuthFailure.user_name == user_name,
                AuthFailure.ts > since,
            )
        )
        or 0
    )
