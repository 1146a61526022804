"""How VMs look from outside: the public JSON of a VM (with its uptime), the list a user
or an admin sees, and what the owner gets from ``/credentials``.

Read-only: nothing here changes a row.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, object_session

from twarga_lab.db import Database
from twarga_lab.db.models import VM, Event, User, VMStatus, utcnow
from twarga_lab.errors import NotFound
from twarga_lab.services import Identity
from twarga_lab.virt.hosts import DEFAULT_HOST
from twarga_lab.virt.seed import key_fingerprint


def uptime_seconds(vm: VM, now: datetime) -> int:
    """Seconds since the VM last started, 0 when it is not running."""
    if vm.status is not VMStatus.running or vm.started_at is None:
        return 0
    return max(0, int((now - vm.started_at).total_seconds()))


# When a running VM will be stopped for idleness, per database: the idle stopper
# (:mod:`twarga_lab.services.idle`) registers itself, weakly (a dropped one goes away).
_idle_deadlines: weakref.WeakKeyDictionary[Engine, weakref.WeakMethod[Any]] = (
    weakref.WeakKeyDictionary()
)


def register_idle_deadline(engine: Engine, deadline: Callable[[VM], datetime | None]) -> None:
    """``deadline(vm)`` (a bound method) answers ``idle_stop_at`` for VMs of ``engine``."""
    _idle_deadlines[engine] = weakref.WeakMethod(deadline)  # type: ignore[arg-type]


def idle_stop_at(vm: VM) -> str | None:
    """When ``vm`` will be stopped for idleness (ISO), None when idle stop is off or it
    does not run."""
    session = object_session(vm)
    engine = session.get_bind() if session is not None else None
    ref = _idle_deadlines.get(engine) if isinstance(engine, Engine) else None
    deadline = ref() if ref is not None else None
    at = deadline(vm) if deadline is not None else None
    return at.isoformat() if at is not None else None


def vm_to_json(
    vm: VM, owner: str, now: datetime | None = None, ready: bool | None = None
) -> dict[str, Any]:
    """The public view of a VM; ``ready``: whether its guest has booted
    (:mod:`.readiness`), None: whether it runs."""
    now = now or utcnow()
    return {
        "id": vm.id,
        "name": vm.name,
        "owner": owner,
        "status": vm.status.value,
        "status_message": vm.status_message,
        "image": vm.image,
        # The seed's name for the image a VM was made from (Twarga Cloud's "ubuntu/focal64").
        "os_type": vm.image,
        "os_family": vm.os_type,
        "ram": vm.ram_mb,
        "cpu": vm.cpu,
        "disk": vm.disk_gb,
        "ip_address": vm.ip_address,
        "ssh_host": "127.0.0.1" if vm.ssh_port else None,
        "ssh_port": vm.ssh_port,
        "domain": vm.domain_name,
        "created_at": vm.created_at.isoformat(),
        "started_at": vm.started_at.isoformat() if vm.started_at else None,
        "uptime": uptime_seconds(vm, now),
        "ready": vm.status is VMStatus.running if ready is None else ready,
        "idle_stop_at": idle_stop_at(vm),
        # A lab's VM: its lab, the template's machine it is, its private addresses.
        "lab_id": vm.lab_id,
        "lab_name": vm.lab.name if vm.lab_id is not None and vm.lab is not None else None,
        "lab_machine": vm.lab_machine,
        "host": vm.host or DEFAULT_HOST,  # the hypervisor host (TwargaLabApp.hosts)
        "addresses": (
            {nic.network.name: nic.address for nic in vm.nics} if vm.lab_id is not None else {}
        ),
    }


def vm_owner_name(session: Session, vm: VM) -> str:
    """The name of a VM's owner (loads the relationship if needed)."""
    owner = session.get(User, vm.owner_id)
    assert owner is not None
    return owner.name


def owned_vm(session: Session, identity: Identity, vm_id: int) -> VM:
    """VM ``vm_id`` if the caller owns it (or is an admin); someone else's VM, like a
    destroyed one, is indistinguishable from no VM at all (404 ``no_vm``)."""
    vm = session.get(VM, vm_id)
    if vm is None or vm.status is VMStatus.destroyed:
        raise NotFound(f"VM {vm_id} does not exist", "no_vm")
    if not identity.admin and vm.owner.name != identity.name:
        raise NotFound(f"VM {vm_id} does not exist", "no_vm")
    return vm


def view(db: Database, vm_id: int, ready: Callable[[VM], bool] | None = None) -> dict[str, Any]:
    """The public view of VM ``vm_id`` as it is now (destroyed ones too: history);
    ``ready`` tells whether a VM's guest has booted."""
    with db.session() as session:
        vm = session.get(VM, vm_id)
        if vm is None:
            raise NotFound(f"VM {vm_id} does not exist", "no_vm")
        return vm_to_json(vm, vm.owner.name, ready=ready(vm) if ready else None)


def list_vms(
    db: Database, owner: str | None, ready: Callable[[VM], bool] | None = None
) -> list[dict[str, Any]]:
    """Live VMs in id order: ``owner``'s, or everyone's for None."""
    with db.session() as session:
        stmt = (
            select(VM, User.name)
            .join(User, VM.owner_id == User.id)
            .where(VM.status != VMStatus.destroyed)
            .order_by(VM.id)
        )
        if owner is not None:
            stmt = stmt.where(User.name == owner)
        now = utcnow()
        return [
            vm_to_json(vm, name, now, ready(vm) if ready else None)
            for vm, name in session.execute(stmt)
        ]


def credentials_view(
    session: Session, vm: VM, username: str, host_key: str | None
) -> dict[str, Any]:
    """How to log in to ``vm``: user, password, SSH forward and the host key to expect,
    and, when its SSH port moved since (another program took the old one), why."""
    result: dict[str, Any] = {
        "username": username,
        "password": vm.root_password,
        "ssh_host": "127.0.0.1",
        "ssh_port": vm.ssh_port,
        "ssh_port_moved": None,
        # What the guest's SSH server must present (compare before typing a password).
        "ssh_host_key": host_key,
        "ssh_host_key_fingerprint": key_fingerprint(host_key) if host_key else None,
    }
    moved = session.scalar(
        select(Event)
        .where(Event.vm_id == vm.id, Event.details["action"].as_string() == "ssh_port_moved")
        .order_by(Event.id.desc())
        .limit(1)
    )
    if moved is not None and moved.details.get("port") == vm.ssh_port:
        # The owner's SSH client knows the old port: say why it changed.
        result["ssh_port_moved"] = {
            "from": moved.details.get("previous_port"),
            "to": vm.ssh_port,
            "at": moved.created_at.isoformat(),
            "reason": "another program was listening on the old port",
        }
    return result
