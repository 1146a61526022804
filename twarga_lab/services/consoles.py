"""VM consoles: who may open one, how it is attached, and the events it leaves.

A console is the VM's serial console over a libvirt stream (``virDomain.openConsole``
with ``VIR_DOMAIN_CONSOLE_FORCE``, see ``virt.console_stream``): it reaches only that
VM's serial line, never a host shell, runs no ``virsh`` subprocess, and a new session
takes over from an old one. The websocket side lives in ``handlers.console``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twarga_lab.db import Database
from twarga_lab.errors import Conflict
from twarga_lab.services import Identity
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.vms import VMService


@dataclass(frozen=True)
class ConsoleTarget:
    """A console a user may open: the VM and its libvirt domain."""

    vm_id: int
    vm_name: str
    owner: str
    domain: str

    @property
    def session_name(self) -> str:
        """One session per VM: a new one replaces the old."""
        return f"vm-{self.vm_id}"


class ConsoleService:
    """Authorises console sessions and records their opening and closing."""

    def __init__(self, db: Database, vms: VMService, libvirt_uri: str) -> None:
        self.db = db
        self.vms = vms
        self.libvirt_uri = libvirt_uri

    async def authorize(self, identity: Identity, vm_id: int) -> ConsoleTarget:
        """The console of a running VM the caller owns (admins: any); NotFound otherwise."""
        vm = await self.vms.get(identity, vm_id)
        if vm["status"] != "running":
            raise Conflict(f"VM {vm['name']} is {vm['status']}: start it first", "vm_not_running")
        return ConsoleTarget(vm_id, vm["name"], vm["owner"], vm["domain"])

    def attach(
        self,
        target: ConsoleTarget,
        on_output: Callable[[bytes], None],
        on_closed: Callable[[str], None],
    ) -> Any:
        """Attach to the VM's serial console, taking it over (blocks: call from a thread).

        Returns a stream with ``write(bytes)`` and ``close()``; ``on_output`` and
        ``on_closed(reason)`` are called from the hypervisor's event thread.
        """
        open_console = getattr(self.vms.backend, "open_console", None)
        if open_console is None:
            raise Conflict("this hypervisor offers no consoles", "no_console")
        return open_console(target.domain, on_output, on_closed)

    def record(
        self, identity: Identity, target: ConsoleTarget, action: str, **details: object
    ) -> None:
        """An ``console_open`` or ``console_close`` event."""
        words = "opened" if action == "console_open" else "closed"
        with self.db.session() as session:
            record_event(
                session, EventType.vm, Severity.info,
                f"console of VM {target.vm_name} {words} by {identity.name}",
                user_name=target.owner, vm_id=target.vm_id, action=action,
                actor=identity.name, **details,
            )  # fmt: skip
