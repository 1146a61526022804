"""The data layer: migrations from the first table, and refusing an outdated schema."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from twarga_lab.cli import main as cli
from twarga_lab.db import Database, upgrade_db
from twarga_lab.db.session import head_revision
from twarga_lab.errors import DatabaseOutdated


def test_a_new_database_is_created_at_head_with_every_table(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    db = Database(url).open()
    tables = set(inspect(db.engine).get_table_names())
    assert {"users", "vms", "events", "metric_chunks", "credit_ledger", "quotas"} <= tables
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    db.dispose()


def test_an_older_schema_is_refused_with_the_command_to_run(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade_db(url, "0001")
    db = Database(url)
    with pytest.raises(DatabaseOutdated, match="twarga-lab upgrade-db"):
        db.open()
    db.dispose()


def test_upgrading_keeps_the_data(tmp_path):
    url = f"sqlite:///{tmp_path / 'data.db'}"
    upgrade_db(url, "0001")
    db = Database(url)
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (name, created_at, active, lock_version) "
                "VALUES ('alice', '2026-01-01 00:00:00', 1, 0)"
            )
        )
    assert upgrade_db(url) == head_revision()
    db.open()
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM users")).scalar() == "alice"
    db.dispose()


def test_a_foreign_database_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'foreign.db'}"
    db = Database(url)
    with db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE stuff (id INTEGER)"))
    with pytest.raises(DatabaseOutdated, match="not made by Twarga"):
        db.open()
    db.dispose()


def test_upgrade_db_command_brings_a_database_to_head(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert cli(["upgrade-db", "--db-url", url]) == 0
    assert head_revision() in capsys.readouterr().out
    Database(url).open().dispose()
