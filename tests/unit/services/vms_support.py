"""A real VMService for the unit tests of ``twarga_lab.services.vms``: libvirt's
``test:///default`` through LibvirtBackend, a SQLite database in ``tmp_path``, the
placeholder ``twarga/tiny`` image and a domain prefix of its own (the test driver is
shared by the whole process)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tests.conftest import make_placeholder_image
from tests.helpers import free_port
from twarga_lab.db import Database
from twarga_lab.db.models import VM, Event, VMStatus
from twarga_lab.errors import NotFound
from twarga_lab.schemas.vms import CreateVM
from twarga_lab.services import Identity
from twarga_lab.services.users import UserService, add_credit_entry, balance_milli, lock_user
from twarga_lab.services.vms import VMService
from twarga_lab.virt.images import ImageStore
from twarga_lab.virt.libvirt_backend import LibvirtBackend

ALICE = Identity("alice")
BOB = Identity("bob")
ADMIN = Identity("root", admin=True)


@dataclass
class World:
    db: Database
    backend: LibvirtBackend
    images: ImageStore
    users: UserService
    vms: VMService
    prefix: str
    image_dir: Path

    def row(self, vm_id: int) -> VM:
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            assert vm is not None
            session.expunge(vm)
            return vm

    def events(self, vm_id: int | None = None, action: str | None = None) -> list[Event]:
        with self.db.session() as session:
            stmt = select(Event).order_by(Event.id)
            if vm_id is not None:
                stmt = stmt.where(Event.vm_id == vm_id)
            rows = session.scalars(stmt).all()
            session.expunge_all()
        return [e for e in rows if action is None or e.details.get("action") == action]

    def set_balance(self, name: str, credits_milli: int) -> None:
        user_id = self.users.ensure(name)
        with self.db.session() as session:
            lock_user(session, user_id)
            delta = credits_milli - balance_milli(session, user_id)
            add_credit_entry(session, user_id, delta, "test", "test")

    def domains(self) -> set[str]:
        return set(self.backend.states(self.prefix))

    async def create(self, owner: Identity = ALICE, **body: Any) -> dict[str, Any]:
        """``POST /twarga/api/vms`` with ``body``, as the handler passes it on."""
        return await self.vms.create(owner, CreateVM.from_body(body))

    async def running_vm(self, name: str = "web", owner: Identity = ALICE) -> dict[str, Any]:
        """A VM created through the service and booted (on the test driver)."""
        vm = await self.create(owner, name=name)
        await self.vms.wait_idle()
        vm = await self.vms.get(owner, vm["id"])
        assert vm["status"] == "running", vm
        return vm


def ssh_ports(count: int) -> tuple[int, int]:
    """``count`` consecutive 127.0.0.1 ports nothing listens on."""
    for _ in range(200):
        first = free_port()
        ports = range(first, first + count)
        if all(_bindable(p) for p in ports):
            return first, first + count - 1
    raise RuntimeError("no free port range")


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def make_users(db: Database) -> UserService:
    return UserService(db, starting_credits=100.0)


@contextlib.contextmanager
def world(tmp_path: Path, ports: int = 5, **config: Any) -> Iterator[World]:
    """A VMService with ``ports`` free SSH ports (not started: tests that want libvirt's
    events call ``start_up``); everything the test left in libvirt is removed afterwards."""
    images = tmp_path / "images"
    image_dir = make_placeholder_image(images)
    db = Database(f"sqlite:///{tmp_path / 'twarga.db'}").open()
    backend = LibvirtBackend("test:///default")
    prefix = f"tu{uuid.uuid4().hex[:8]}-"
    low, high = ssh_ports(ports)
    settings: dict[str, Any] = {
        "vms_dir": tmp_path / "vms",
        "domain_type": "qemu",
        "domain_prefix": prefix,
        "stop_timeout": 2.0,
        "ssh_port_min": low,
        "ssh_port_max": high,
        **config,
    }
    users = make_users(db)
    vms = VMService(db, backend, ImageStore(images), users, **settings)
    try:
        yield World(db, backend, vms.images, users, vms, prefix, image_dir)
    finally:
        for name in backend.states(prefix):
            with contextlib.suppress(NotFound):
                backend.destroy(name)
            with contextlib.suppress(NotFound):
                backend.undefine(name)
        backend.close()
        db.dispose()


async def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``check`` (run in a thread) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await asyncio.to_thread(check)
        if result:
            return result
        if loop.time() >= deadline:
            raise AssertionError(f"not true within {timeout} s: {check}")
        await asyncio.sleep(0.05)


def status(w: World, vm_id: int) -> VMStatus:
    return w.row(vm_id).status
