"""Idle stop on a real tiny guest: typing on its console and an SSH connection on its
forward keep it running; left alone for ``idle_stop_after`` it is powered off gracefully,
with an ``idle_stopped`` event."""

from __future__ import annotations

import json
import socket
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from tests.helpers import wait_for, wait_status
from tests.identity import auth
from tests.real.test_real_console import console_url, read_until
from twarga_lab.db.models import Event
from twarga_lab.services.idle import established_ports, utcnow

pytestmark = pytest.mark.real

IDLE = 30


@pytest.fixture
def twarga_config(real_settings) -> dict:
    return real_settings(25900, idle_stop_after=IDLE)


def events(twarga, vm_id: int) -> list[Event]:
    with twarga.services.db.session() as session:
        return list(session.scalars(select(Event).where(Event.vm_id == vm_id).order_by(Event.id)))


async def test_a_real_idle_guest_is_stopped_and_use_keeps_it(
    api, twarga, jp_ws_fetch, cleanup_domains
):
    idle = twarga.services.idle
    # The server's own periodic check, every second instead of every 30.
    await idle.stop()
    idle.idle_check_interval = 1.0
    idle.start()
    reply = await api("POST", "vms", body={"name": "idler"})
    vm = await wait_status(api, reply.json["id"], "running", timeout=90)

    async def ready() -> bool:
        return (await api("GET", f"vms/{vm['id']}")).json["ready"]

    await wait_for(ready, timeout=90, interval=0.2)  # the guest's banner is on its console

    async def deadline() -> datetime:
        shown = (await api("GET", f"vms/{vm['id']}")).json["idle_stop_at"]
        assert shown is not None
        return datetime.fromisoformat(shown)

    # Typing on the console (the real websocket) pushes the deadline later.
    before = await deadline()
    ws = await jp_ws_fetch(*console_url(vm), headers=auth("alice-token"))
    await read_until(ws, "Escape character")
    typed_at = utcnow()
    ws.write_message(json.dumps(["stdin", "echo typed-$((1+1))\r"]))
    await read_until(ws, r"(^|\n)typed-2\r?\n")
    after_typing = await deadline()
    assert after_typing > before
    assert after_typing >= typed_at + timedelta(seconds=IDLE)
    ws.close()

    # An SSH connection on the forward: the guest's dropbear greets, the kernel's table
    # shows it established on 127.0.0.1:ssh_port, and the check counts it as use.
    with socket.create_connection(("127.0.0.1", vm["ssh_port"]), timeout=10) as ssh:
        assert ssh.recv(64).startswith(b"SSH-2.0-")
        assert vm["ssh_port"] in established_ports()
        checked_at = utcnow()
        assert await idle.tick() == []
        assert await deadline() >= checked_at + timedelta(seconds=IDLE)

    # Left alone (an idle guest's CPU stays under 5 %): stopped once the deadline passes.
    stop_at = await deadline()
    stopped = await wait_status(api, vm["id"], "stopped", timeout=IDLE + 60)
    assert utcnow() >= stop_at
    assert stopped["idle_stop_at"] is None
    assert twarga.services.backend.state(vm["domain"]).value == "shutoff"
    found = events(twarga, vm["id"])
    [idle_event] = [e for e in found if e.details.get("action") == "idle_stopped"]
    assert idle_event.user_name == "alice" and "idle" in idle_event.message
    assert idle_event.details["idle_seconds"] >= IDLE
    # Through the normal stop: requested by the system, and the guest powered off by itself.
    messages = [e.message for e in found]
    assert "VM stop requested by system" in messages
    assert not any("forced off" in m for m in messages), messages
