"""Events are rows added to the caller's transaction, and logged with their severity."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from twarga_lab.db import Database
from twarga_lab.db.models import Event
from twarga_lab.services.events import EventType, Severity, record_event


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'events.db'}").open()
    yield database
    database.dispose()


def test_an_event_is_stored_with_its_fields_and_details(db):
    with db.session() as session:
        record_event(
            session,
            EventType.security,
            Severity.critical,
            "brute force against web",
            user_name="alice",
            source="10.0.0.5",
            attempts=6,
            users=["root", "twarga"],
        )
    with db.session() as session:
        (event,) = session.scalars(select(Event))
        assert (event.type, event.severity, event.message) == (
            "security",
            "critical",
            "brute force against web",
        )
        assert (event.user_name, event.vm_id, event.source) == ("alice", None, "10.0.0.5")
        assert event.details == {"attempts": 6, "users": ["root", "twarga"]}
        assert event.created_at is not None


def test_an_event_rolls_back_with_its_transaction(db):
    with pytest.raises(RuntimeError), db.session() as session:
        record_event(session, EventType.vm, Severity.info, "created web")
        raise RuntimeError("the caller failed")
    with db.session() as session:
        assert session.scalars(select(Event)).all() == []


def test_warnings_and_worse_are_logged_as_warnings(db, caplog):
    caplog.set_level(logging.INFO, logger="twarga_lab.events")
    with db.session() as session:
        record_event(session, EventType.auth, Severity.info, "alice signed in")
        record_event(session, EventType.system, Severity.warning, "disk almost full")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "[auth/info] alice signed in"),
        (logging.WARNING, "[system/warning] disk almost full"),
    ]


def test_the_enums_are_the_api_strings():
    assert [t.value for t in EventType] == ["vm", "auth", "system", "security"]
    assert [s.value for s in Severity] == ["info", "warning", "critical"]
