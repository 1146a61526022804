"""Engine and session factory; schema version checks and upgrades (alembic)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from twarga_lab.errors import DatabaseOutdated, DatabaseUnavailable

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the single writer; busy_timeout makes writers queue
    # instead of failing; SQLite ignores foreign keys unless told per connection.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the pragmas and pool Twarga needs on SQLite."""
    if url.startswith("sqlite"):
        connect_args = {"check_same_thread": False, "timeout": 30}
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    if url.startswith("postgresql") and "connect_timeout" not in url:
        # A server that does not answer (rather than refusing) fails a request in
        # seconds, not after the kernel's TCP timeout.
        kwargs.setdefault("connect_args", {"connect_timeout": CONNECT_TIMEOUT})
    # pool_pre_ping: a pooled connection a database restart closed is replaced, not used.
    return create_engine(url, pool_pre_ping=True, **kwargs)


#: Seconds a new PostgreSQL connection may take before the request gets a 503.
CONNECT_TIMEOUT = 5


def unavailable(error: BaseException) -> DatabaseUnavailable | None:
    """The 503 to answer for ``error`` when it says the database server cannot be
    reached (refused, shut down, the connection dropped), else None. SQLite has no
    server: its errors are left as they are."""
    if not isinstance(error, DBAPIError):
        return None
    if type(error.orig).__module__.startswith("sqlite3"):
        return None
    if not (error.connection_invalidated or isinstance(error, OperationalError)):
        return None
    return DatabaseUnavailable(
        "the database is unavailable right now; try again in a moment", "database_unavailable"
    )


def alembic_config(url: str) -> AlembicConfig:
    """An alembic configuration for ``url`` without an ini file."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest migration the code knows."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for a database alembic never touched."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_db(url: str, revision: str = "head") -> str:
    """Bring the database at ``url`` to ``revision``; returns the revision reached."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
        return current_revision(engine) or ""
    finally:
        engine.dispose()


class Database:
    """The engine and the session factory of one Twarga database.

    ``Database(url).open()`` creates a brand-new database at the newest schema, accepts one
    that is current, and refuses one that is older (or newer) than the code.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def open(self) -> Database:
        """Check (or create) the schema; raises DatabaseOutdated when it is not current."""
        head = head_revision()
        current = current_revision(self.engine)
        if current is None:
            if inspect(self.engine).get_table_names():
                raise DatabaseOutdated(
                    f"the database at {self.url} has tables but no migration history; "
                    "it was not made by Twarga Lab"
                )
            log.info("creating a new Twarga database at %s", self.url)
            upgrade_db(self.url)
        elif current != head:
            raise DatabaseOutdated(
                f"the database is at schema revision {current} but this Twarga Lab needs "
                f"{head}: run `twarga-lab upgrade-db --db-url '{self.url}'` (back it up first)"
            )
        return self

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One session for one service operation: committed on success, rolled back on
        error; DatabaseUnavailable (503) when the database server cannot be reached."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException as error:
            session.rollback()
            down = unavailable(error)
            if down is not None:
                raise down from error
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
