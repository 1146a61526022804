"""fail2ban's semantics in the database: ``maxretry`` failures within ``findtime`` ban a
source on one scope, each further ban doubles (capped), and old failures do not count."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from twarga_lab.db import Database
from twarga_lab.db.models import AuthFailure
from twarga_lab.services.bans import BanPolicy, active_ban, failures_by_user, record_failure

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY = BanPolicy(maxretry=3, findtime=60.0, bantime=100.0, max_bantime=350.0)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'bans.db'}").open()
    yield database
    database.dispose()


def fail(db: Database, at: datetime, source: str = "10.0.0.5", scope: str = "hub", **kw):
    with db.session() as session:
        return record_failure(session, POLICY, scope, source, now=at, **kw)


def test_ban_durations_double_and_are_capped():
    assert [POLICY.duration(n).total_seconds() for n in (0, 1, 2, 3, 4)] == [
        100.0,
        100.0,
        200.0,
        350.0,
        350.0,
    ]


def test_maxretry_failures_in_the_window_ban_the_source_for_bantime(db):
    first = fail(db, T0)
    second = fail(db, T0 + timedelta(seconds=10))
    assert (first.failures_in_window, first.newly_banned) == (1, False)
    assert (second.failures_in_window, second.newly_banned) == (2, False)
    third = fail(db, T0 + timedelta(seconds=20))
    assert third.newly_banned and third.ban_count == 1
    assert third.banned_until == T0 + timedelta(seconds=120)
    with db.session() as session:
        assert active_ban(session, "hub", "10.0.0.5", T0 + timedelta(seconds=119)) is not None
        assert active_ban(session, "hub", "10.0.0.5", T0 + timedelta(seconds=120)) is None
        # The failures that led to the ban are cleared.
        assert session.scalar(select(func.count(AuthFailure.id))) == 0


def test_failures_older_than_findtime_do_not_count(db):
    fail(db, T0)
    fail(db, T0 + timedelta(seconds=30))
    late = fail(db, T0 + timedelta(seconds=61))
    assert late.failures_in_window == 2 and not late.newly_banned


def test_scopes_and_sources_are_counted_apart(db):
    for i in range(2):
        fail(db, T0 + timedelta(seconds=i))
    assert fail(db, T0 + timedelta(seconds=3), scope="vm:7").failures_in_window == 1
    assert fail(db, T0 + timedelta(seconds=4), source="10.0.0.6").failures_in_window == 1
    with db.session() as session:
        assert active_ban(session, "hub", "10.0.0.5", T0 + timedelta(seconds=5)) is None


def test_failures_during_a_ban_do_not_extend_it_and_the_next_ban_doubles(db):
    for i in range(3):
        outcome = fail(db, T0 + timedelta(seconds=i))
    assert outcome.ban_count == 1
    ban_end = outcome.banned_until
    assert ban_end is not None
    for i in range(3):
        during = fail(db, T0 + timedelta(seconds=10 + i))
    assert not during.newly_banned
    with db.session() as session:
        ban = active_ban(session, "hub", "10.0.0.5", T0 + timedelta(seconds=20))
        assert ban is not None and ban.banned_until == ban_end and ban.ban_count == 1
    after = ban_end + timedelta(seconds=1)
    outcomes = [fail(db, after + timedelta(seconds=i)) for i in range(3)]
    assert outcomes[-1].ban_count == 2
    assert outcomes[-1].banned_until == after + timedelta(seconds=2 + 200)


def test_failures_by_user_counts_one_name_on_one_scope_since_a_time(db):
    fail(db, T0, user_name="alice")
    fail(db, T0 + timedelta(seconds=1), source="10.0.0.9", user_name="alice")
    fail(db, T0 + timedelta(seconds=2), user_name="bob")
    fail(db, T0 + timedelta(seconds=3), scope="vm:1", user_name="alice")
    with db.session() as session:
        assert failures_by_user(session, "hub", "alice", T0 - timedelta(seconds=1)) == 2
        assert failures_by_user(session, "hub", "alice", T0) == 1
        assert failures_by_user(session, "hub", "carol", T0 - timedelta(seconds=1)) == 0
