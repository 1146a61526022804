"""Test helpers: poll with a deadline instead of sleeping; ports for test servers."""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def wait_for(
    probe: Callable[[], Awaitable[Any]], *, timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Await ``probe()`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last: {last!r})")


async def wait_status(
    api: Any, vm_id: int, status: str, *, user: str = "alice", timeout: float = 10.0
) -> dict[str, Any]:
    """Poll ``GET /vms/{id}`` until the VM has ``status``; returns the VM."""

    async def probe() -> dict[str, Any] | None:
        reply = await api("GET", f"vms/{vm_id}", user=user)
        assert reply.status == 200, reply.json
        if reply.json["status"] == "error" and status != "error":
            raise AssertionError(f"VM {vm_id} failed: {reply.json['status_message']}")
        return reply.json if reply.json["status"] == status else None

    return await wait_for(probe, timeout=timeout)


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    """``virsh -c qemu:///system ARGS`` (a libvirt client we did not write)."""
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=30
    )


def destroy_domains(prefix: str) -> None:
    """Destroy and undefine every domain whose name starts with ``prefix``."""
    for name in virsh("list", "--all", "--name").stdout.split():
        if name.startswith(prefix):
            virsh("destroy", name)
            virsh("undefine", name)


# Below the kernel's ephemeral range (32768+), so no outgoing connection can take the port
# between our check and the server's bind, and above the VMs' SSH forwards (22000-22999).
LISTEN_PORTS = range(30000, 32700)
_handed_out: set[int] = set()


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on, never the same one twice in this run."""
    for _ in range(500):
        port = random.choice(LISTEN_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise AssertionError(f"no free port in {LISTEN_PORTS}")


def events_of_action(twarga: Any, action: str) -> list[Any]:
    """The events whose ``details.action`` is ``action``, oldest first."""
    from sqlalchemy import select

    from twarga_lab.db.models import Event

    with twarga.services.db.session() as session:
        return list(
            session.scalars(
                select(Event)
                .where(Event.details["action"].as_string() == action)
                .order_by(Event.id)
            )
        )
