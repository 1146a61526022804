"""PostgreSQL stopped and started again under a running service: while it is down the API
answers 503 ``database_unavailable`` quickly (JSON ``{"message", "reason"}``), and once it
is back the same service process serves again, with nothing lost."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PG_BIN
from tests.helpers import wait_status

AS_POSTGRES = ["runuser", "-u", "postgres", "--"]


@dataclass
class Cluster:
    """A throwaway PostgreSQL cluster this module may stop and start (the session's
    ``postgres_server`` is shared with other tests, so it is not the one taken down)."""

    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/twarga"

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*AS_POSTGRES, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", *args],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data} -F"
        self.pg_ctl("-l", str(self.data / "log"), "-o", options, "start")

    def stop(self) -> None:
        self.pg_ctl("-m", "fast", "stop")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not (PG_BIN / "initdb").exists():
        pytest.fail("PostgreSQL 15 is not installed: `make test` installs Debian's postgresql")
    data = Path("/tmp") / f"twarga-pg-restart-{uuid.uuid4().hex[:8]}"
    data.mkdir(mode=0o700)
    shutil.chown(data, "postgres", "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run([*AS_POSTGRES, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust",
                    "-U", "postgres", "--no-sync"], check=True, capture_output=True)  # fmt: skip
    found = Cluster(data, port)
    found.start()
    subprocess.run(
        [*AS_POSTGRES, str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port),
         "-U", "postgres", "twarga"],
        check=True, capture_output=True,
    )  # fmt: skip
    yield found
    subprocess.run(
        [*AS_POSTGRES, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
        capture_output=True,
    )  # fmt: skip
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def twarga_config(cluster: Cluster) -> dict[str, Any]:
    return {"db_url": cluster.url}


async def timed(api: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.monotonic()
    reply = await api(*args, **kwargs)
    return reply, time.monotonic() - started


async def test_postgres_down_answers_503_and_the_service_recovers_without_a_restart(
    api: Any, twarga: Any, cluster: Cluster
) -> None:
    assert twarga.services.db.engine.dialect.name == "postgresql"
    before = await api("POST", "vms", body={"name": "pg-before"})
    assert before.status == 201, before.json
    await wait_status(api, before.json["id"], "running")

    stop_started = time.monotonic()
    cluster.stop()
    stop_took = time.monotonic() - stop_started
    down = {}
    try:
        for label, call in {
            "GET /vms": ("GET", "vms"),
            "GET /vms/{id}": ("GET", f"vms/{before.json['id']}"),
            "POST /vms": ("POST", "vms"),
            "GET /me": ("GET", "me"),
        }.items():
            method, path = call
            body = {"name": "pg-while-down"} if method == "POST" else None
            reply, took = await timed(api, method, path, body=body)
            down[label] = (reply.status, took)
            assert reply.status == 503, (label, reply.status, reply.json)
            assert set(reply.json) >= {"message", "reason"}, reply.json
            assert reply.json["reason"] == "database_unavailable", reply.json
            assert took < 3, f"{label} answered in {took:.2f} s"
    finally:
        start_started = time.monotonic()
        cluster.start()
        start_took = time.monotonic() - start_started

    # The same service, never restarted: its first request is served (the pool drops the
    # connections the restart closed instead of handing them out), and nothing is lost.
    first, recovered = await timed(api, "GET", "vms")
    assert first.status == 200, first.json
    assert [(v["name"], v["status"]) for v in first.json] == [("pg-before", "running")]
    after = await api("POST", "vms", body={"name": "pg-after"})
    assert after.status == 201, after.json
    await wait_status(api, after.json["id"], "running")
    names = sorted(v["name"] for v in (await api("GET", "vms")).json)
    assert names == ["pg-after", "pg-before"]  # the refused create left nothing behind
    await twarga.services.vms.wait_idle()

    # A restart with no request in between: the pooled connections are all stale.
    cluster.stop()
    cluster.start()
    again, again_took = await timed(api, "GET", "vms")
    assert again.status == 200, again.json
    assert sorted(v["name"] for v in again.json) == ["pg-after", "pg-before"]
    stopped = await api("POST", f"vms/{after.json['id']}/action", body={"action": "force-stop"})
    assert stopped.status == 200 and stopped.json["status"] == "stopped", stopped.json

    print(f"\npg_ctl stop -m fast: {stop_took:.2f} s; pg_ctl start: {start_took:.2f} s")
    for label, (status, took) in down.items():
        print(f"  while down: {label} -> {status} in {took * 1000:.0f} ms")
    print(f"  first request after the start: 200 in {recovered * 1000:.0f} ms (same process)")
    print(f"  after a restart with no request between: 200 in {again_took * 1000:.0f} ms")
