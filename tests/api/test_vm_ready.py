"""``"ready"`` in the VM JSON on libvirt's test driver: no guest runs there, so the test
writes the guest's console banner into the console log the service follows
(``<vms_dir>/instances/<domain>/console.log``), and plays the guest's SSH server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import jsonschema
import pytest
from sqlalchemy import select

from tests.conftest import make_placeholder_image
from tests.helpers import wait_for, wait_status
from twarga_lab.db.models import Event
from twarga_lab.event_schemas import load_schema
from twarga_lab.virt.images import TINY_READY_BANNER


@pytest.fixture
def fake_image_dir(tmp_path: Path) -> Path:
    """The placeholder twarga/tiny with tiny's ready banner, and one without any."""
    images = tmp_path / "images"
    folder = make_placeholder_image(images)
    meta = json.loads((folder / "image.json").read_text())
    (folder / "image.json").write_text(json.dumps({**meta, "ready_banner": TINY_READY_BANNER}))
    make_placeholder_image(images, "plain/img")
    return images


def console(twarga, vm) -> Path:
    return twarga.services.vms.instance_dir(vm["domain"]) / "console.log"


def append(twarga, vm, text: str) -> None:
    with console(twarga, vm).open("a") as f:
        f.write(text)


async def ready_is(api, vm_id: int, expected: bool) -> dict:
    async def probe():
        got = (await api("GET", f"vms/{vm_id}")).json
        listed = [v for v in (await api("GET", "vms")).json if v["id"] == vm_id]
        return got if got["ready"] is expected and listed[0]["ready"] is expected else None

    return await wait_for(probe, timeout=10)


def ready_events(twarga, vm_id: int) -> list[Event]:
    with twarga.services.db.session() as session:
        rows = session.scalars(select(Event).where(Event.vm_id == vm_id).order_by(Event.id))
        events = [e for e in rows if e.details.get("action") == "ready"]
        session.expunge_all()
    return events


async def create_running(api, name: str, **extra) -> dict:
    reply = await api("POST", "vms", body={"name": name, **extra})
    assert reply.status == 201, reply.json
    assert reply.json["ready"] is False
    return await wait_status(api, reply.json["id"], "running")


async def test_a_vm_is_ready_once_its_banner_appears_and_again_after_each_start(api, twarga):
    vm = await create_running(api, "web-1")
    assert vm["ready"] is False
    append(twarga, vm, "[    0.9] Run /init as init process\r\nTwarga Lab VM web-1 is")
    await stays_not_ready(api, vm["id"])
    append(twarga, vm, " up\r\n~ # ")
    await ready_is(api, vm["id"], True)

    (event,) = ready_events(twarga, vm["id"])
    assert event.type == "vm" and event.details["detail"] == "console banner (boot)"
    assert event.details["ready_seconds"] >= 0
    # The SOC shows it, as the vm event schema says.
    soc = await api("GET", "soc/events", user="admin", params={"vm_id": str(vm["id"])})
    (shown,) = [e for e in soc.json if e["details"].get("action") == "ready"]
    assert shown["message"].startswith("VM web-1 is ready (console banner, ")
    jsonschema.validate(shown, load_schema("vm"))

    # Stopped: not ready; started again: not ready until this boot's banner.
    await api("POST", f"vms/{vm['id']}/action", body={"action": "force-stop"})
    await wait_status(api, vm["id"], "stopped")
    assert (await api("GET", f"vms/{vm['id']}")).json["ready"] is False
    await api("POST", f"vms/{vm['id']}/action", body={"action": "start"})
    await wait_status(api, vm["id"], "running")
    await stays_not_ready(api, vm["id"])
    append(twarga, vm, "Twarga Lab VM web-1 is up\r\n")
    await ready_is(api, vm["id"], True)
    assert len(ready_events(twarga, vm["id"])) == 2


async def test_a_revert_to_a_running_snapshot_is_ready_when_sshd_greets(api, twarga):
    vm = await create_running(api, "snappy")
    append(twarga, vm, "Twarga Lab VM snappy is up\n")
    await ready_is(api, vm["id"], True)
    assert (await api("POST", f"vms/{vm['id']}/snapshots", body={"name": "s1"})).status == 201
    reverted = await api("POST", f"vms/{vm['id']}/snapshots/s1", body={"action": "revert"})
    assert reverted.status == 200, reverted.json
    assert reverted.json["ready"] is False  # the guest resumes: no banner will come
    with _ssh_greeting(vm["ssh_port"]):
        await ready_is(api, vm["id"], True)
    assert ready_events(twarga, vm["id"])[-1].details["detail"] == (
        "SSH server answering (resumed)"
    )


async def test_an_image_without_a_banner_is_ready_when_running(api, twarga):
    vm = await create_running(api, "plain", image="plain/img")
    assert vm["ready"] is True
    await api("POST", f"vms/{vm['id']}/action", body={"action": "force-stop"})
    stopped = await wait_status(api, vm["id"], "stopped")
    assert stopped["ready"] is False
    assert ready_events(twarga, vm["id"]) == []


async def test_a_restarted_service_recovers_readiness(api, twarga):
    vm = await create_running(api, "again")
    append(twarga, vm, "Twarga Lab VM again is up\n")
    await ready_is(api, vm["id"], True)
    vms = twarga.services.vms
    await vms.readiness.close()  # what a service that stops forgets
    assert (await api("GET", f"vms/{vm['id']}")).json["ready"] is False
    assert await vms.readiness.recover() == 1  # what start_up does
    await ready_is(api, vm["id"], True)
    assert len(ready_events(twarga, vm["id"])) == 1


async def stays_not_ready(api, vm_id: int, seconds: float = 0.6) -> None:
    """``ready`` stays false for ``seconds`` (polled, like the service's watcher polls)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = (await api("GET", f"vms/{vm_id}")).json
        assert got["ready"] is False, got
        await asyncio.sleep(0.05)


class _ssh_greeting:
    """Listen on 127.0.0.1:``port`` and greet like an SSH server."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(8)
        self.sock.settimeout(0.05)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n")

    def __enter__(self) -> None:
        self.thread.start()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
