"""VM consoles: who may open one, what runs it, and the events it leaves.

The terminal itself is a pty running ``virsh console --force <domain>`` (terminado, in
``handlers.console``): it reaches only that VM's serial console, never a host shell, and
``--force`` makes a new session take over from an old one.
"""

from __future__ import annotations

from dataclasses import dataclass

from twarga_lab.db import Database
from twarga_lab.errors import Conflict
from twarga_lab.services import Identity
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.vms import VMService


@dataclass(frozen=True)
class ConsoleTarget:
    """A console a user may open: the VM and the command that attaches to it."""

    vm_id: int
    vm_name: str
    owner: str
    domain: str
    argv: tuple[str, ...]

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
        argv = ("virsh", "-c", self.libvirt_uri, "console", "--force", vm["domain"])
        return ConsoleTarget(vm_id, vm["name"], vm["owner"], vm["domain"], argv)

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
