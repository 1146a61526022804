"""A real service process killed with SIGKILL in the middle of a destroy, then started
again on the same database and VM storage: the destroy is finished, nothing is left."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import REPO
from tests.helpers import destroy_domains, virsh
from tests.real.conftest import running_server

pytestmark = pytest.mark.real
ALICE = {"Authorization": "token alice-token"}


def poll(probe, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)


def server_pid(url: str) -> int:
    port = url.rstrip("/").rsplit(":", 1)[1]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"--port={port}".encode() in argv and any(b"jupyter" in a for a in argv[:2]):
            return int(entry.name)
    raise AssertionError(f"no server process on port {port}")


def test_a_service_killed_mid_destroy_finishes_it_when_it_starts_again():
    base = REPO / "vms" / "test-runs" / f"crash-{secrets.token_hex(4)}"
    base.mkdir(parents=True)
    for folder in (base, base.parent):
        folder.chmod(0o755)
    prefix = f"twk{secrets.token_hex(3)}-"
    db = base / "twarga.db"
    same_state = [
        f"--TwargaLabApp.vms_dir={base / 'vms'}",
        f"--TwargaLabApp.db_url=sqlite:///{db}",
        f"--TwargaLabApp.domain_prefix={prefix}",
    ]
    engine = create_engine(f"sqlite:///{db}")

    def status(vm_id: int) -> str | None:
        with engine.connect() as conn:
            return conn.execute(text("SELECT status FROM vms WHERE id = :i"), {"i": vm_id}).scalar()

    try:
        with running_server(23800, *same_state) as server:
            api = server.url + "twarga/api/"
            vm = httpx.post(api + "vms", headers=ALICE, json={"name": "doomed"}).json()
            domain, vm_id = vm["domain"], vm["id"]
            assert domain.startswith(prefix)

            def running():
                reply = httpx.get(api + f"vms/{vm_id}", headers=ALICE).json()
                assert reply["status"] != "error", reply
                return reply["status"] == "running"

            poll(running, 90, "the VM runs")
            folder = base / "vms" / "instances" / domain
            assert (folder / "disk.qcow2").exists()
            # A frozen QEMU makes libvirt's destroy wait (SIGTERM, then SIGKILL after ~10 s):
            # the service is then in the middle of the destroy, and dies there.
            qemu = int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text())
            os.kill(qemu, signal.SIGSTOP)

            def destroy() -> None:
                with contextlib.suppress(httpx.TransportError):  # it dies before answering
                    httpx.delete(api + f"vms/{vm_id}", headers=ALICE, timeout=60)

            threading.Thread(target=destroy, daemon=True).start()
            poll(lambda: status(vm_id) == "destroying", 10, "the destroy starts")
            os.kill(server_pid(server.url), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(qemu, signal.SIGCONT)
        # Killed mid-way: the row says destroying, the domain is defined, the disk is there.
        assert status(vm_id) == "destroying"
        assert virsh("dominfo", domain).returncode == 0
        assert (folder / "disk.qcow2").exists()

        with running_server(23800, *same_state) as server:
            api = server.url + "twarga/api/"
            # The service came back: the destroy is finished, nothing of the VM is left.
            assert httpx.get(api + f"vms/{vm_id}", headers=ALICE).status_code == 404
            assert status(vm_id) == "destroyed"
            assert virsh("dominfo", domain).returncode != 0
            assert not folder.exists()
            events = httpx.get(api + "soc/events", headers=ALICE, params={"limit": 50}).json()
            rows = events["events"] if isinstance(events, dict) else events
            assert any("destroy of VM" in e["message"] and "finished" in e["message"] for e in rows)
    finally:
        engine.dispose()
        destroy_domains(prefix)
        shutil.rmtree(base, ignore_errors=True)
