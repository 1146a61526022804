"""The same API on PostgreSQL, the production database: atomic quotas, the lifecycle,
credits under concurrency, and migrations from the first revision."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from tests.helpers import wait_status
from twarga_lab.db import Database, upgrade_db
from twarga_lab.db.session import head_revision
from twarga_lab.errors import DatabaseOutdated


@pytest.fixture
def twarga_config(postgres_url):
    return {"db_url": postgres_url}


async def test_twenty_parallel_creates_respect_a_quota_of_five(api, twarga):
    assert twarga.services.db.engine.dialect.name == "postgresql"
    replies = await asyncio.gather(
        *(api("POST", "vms", body={"name": f"pg-{i}"}) for i in range(20))
    )
    assert sorted(r.status for r in replies).count(201) == 5
    assert {r.json["reason"] for r in replies if r.status != 201} == {"quota_exceeded"}
    await twarga.services.vms.wait_idle()
    assert len((await api("GET", "vms")).json) == 5


async def test_lifecycle_and_validation(api):
    reply = await api("POST", "vms", body={"name": "pg-web", "ram": 1024})
    vm = await wait_status(api, reply.json["id"], "running")
    assert (await api("POST", "vms", body={"name": "pg-web"})).json["reason"] == "name_taken"
    assert (await api("POST", "vms", body={"name": "Bad"})).status == 422
    stopped = await api("POST", f"vms/{vm['id']}/action", body={"action": "force-stop"})
    assert stopped.json["status"] == "stopped"
    assert (await api("DELETE", f"vms/{vm['id']}")).status == 204
    assert (await api("POST", "vms", body={"name": "pg-web"})).status == 201


async def test_concurrent_grants_lose_no_ledger_row(api):
    await api("GET", "me")
    grants = await asyncio.gather(
        *(
            api("POST", "admin/users/alice/credits", user="admin",
                body={"amount": 1, "reason": f"grant {i}"})
            for i in range(20)
        )
    )  # fmt: skip
    assert all(g.status == 200 for g in grants)
    assert sorted(g.json["new_balance"] for g in grants) == [1001 + i for i in range(20)]
    assert (await api("GET", "me")).json["credits"] == 1020


def test_migrations_from_the_first_revision(postgres_url):
    upgrade_db(postgres_url, "0001")
    db = Database(postgres_url)
    with pytest.raises(DatabaseOutdated, match="twarga-lab upgrade-db"):
        db.open()
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO users (name, created_at, active, lock_version) "
                          "VALUES ('alice', now(), true, 0)"))  # fmt: skip
    assert upgrade_db(postgres_url) == head_revision()
    db.open()
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM users")).scalar() == "alice"
    db.dispose()
