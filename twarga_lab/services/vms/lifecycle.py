"""VM lifecycle: the per-VM locks, status transitions (each one an event, the running
time billed when a VM stops running), background work, and the actions start, stop,
restart, force-stop and destroy, plus the first boot of a newly created VM.

Actions return at once; long work (a guest taking its time to power off) continues in
the background and moves the status when it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from twarga_lab.db import Database
from twarga_lab.db.models import VM, VMStatus, utcnow
from twarga_lab.errors import NotFound, TwargaError
from twarga_lab.services import Identity
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.vms.provisioning import Provisioner
from twarga_lab.virt.backend import DomainState, HypervisorBackend
from twarga_lab.virt.hosts import HostPool

if TYPE_CHECKING:
    from twarga_lab.services.vms.settings import VMServiceConfig

log = logging.getLogger(__name__)
run = asyncio.to_thread

ACTIONS = ("start", "stop", "restart", "destroy", "force-stop")

# Statuses Twarga sets itself around its own calls: a libvirt event seen in one of them
# is the expected outcome; seen in any other status, something acted behind our back.
TRANSITIONAL = {
    VMStatus.pending,
    VMStatus.starting,
    VMStatus.stopping,
    VMStatus.destroying,
}

STATE_TO_STATUS = {
    DomainState.running: VMStatus.running,
    DomainState.paused: VMStatus.paused,
    DomainState.shutting_down: VMStatus.stopping,
    DomainState.shutoff: VMStatus.stopped,
    DomainState.crashed: VMStatus.error,
}
_STATE_TO_STATUS = STATE_TO_STATUS  # the name vms.py had


def status_for(state: DomainState) -> VMStatus:
    """The VM status a settled libvirt state means (error for anything unexpected)."""
    return STATE_TO_STATUS.get(state, VMStatus.error)


class BackgroundTasks:
    """Work that outlives a request; failures are logged, never lost silently."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self.tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %s failed", what, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def wait(self, timeout: float) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)

    async def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await self.wait(5)


class StatusBook:
    """The VM rows' status, changed one VM at a time under its lock."""

    #: Told of every change of a row's status, in its session: ``(vm, previous, action)``
    #: (the VM service's readiness watcher; it must not raise).
    on_change: Callable[[VM, VMStatus, str], None] | None = None

    def __init__(self, db: Database, settle: Callable[[Session, VM], object]) -> None:
        self.db = db
        # Bills ``vm``'s running time since the last metering pass as it leaves running.
        self.settle = settle
        self._locks: dict[int, asyncio.Lock] = {}

    def lock(self, vm_id: int) -> asyncio.Lock:
        """The lock every change of VM ``vm_id`` holds."""
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def forget(self, vm_id: int) -> None:
        """Drop the lock of a destroyed VM."""
        self._locks.pop(vm_id, None)

    def status(self, vm_id: int) -> VMStatus | None:
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            return vm.status if vm is not None else None

    def domain_name(self, vm_id: int) -> str:
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            assert vm is not None and vm.domain_name is not None
            return vm.domain_name

    def set_status(
        self,
        vm_id: int,
        status: VMStatus,
        message: str | None,
        action: str,
        actor: str | None = None,
        severity: Severity | None = None,
        note: str | None = None,
    ) -> None:
        """Move a VM to ``status`` and record the change (nothing for a destroyed VM)."""
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            if vm is None or vm.status is VMStatus.destroyed:
                return
            previous = vm.status
            if status is VMStatus.running and previous is not VMStatus.running:
                vm.started_at = utcnow()
            if previous is VMStatus.running and status is not VMStatus.running:
                self.settle(session, vm)
            vm.status = status
            vm.status_message = message
            if previous is not status and self.on_change is not None:
                self.on_change(vm, previous, action)
            if previous is status and note is None:
                return
            text = note or f"VM {vm.name} is {status.value}" + (f": {message}" if message else "")
            if severity is None:
                severity = Severity.warning if status is VMStatus.error else Severity.info
            record_event(
                session, EventType.vm, severity, text,
                user_name=vm.owner.name, vm_id=vm.id, action=action, actor=actor,
                previous=previous.value, status=status.value,
            )  # fmt: skip

    def mark_destroyed(self, vm_id: int, actor: str, note: str | None) -> None:
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            assert vm is not None
            vm.status = VMStatus.destroyed
            vm.destroyed_at = utcnow()
            vm.status_message = None
            record_event(
                session, EventType.vm, Severity.info,
                note or f"VM {vm.name} destroyed by {actor}",
                user_name=vm.owner.name, vm_id=vm.id, action="destroy", actor=actor,
            )  # fmt: skip


class Lifecycle:
    """Boots, stops and destroys VMs through the hypervisor, moving their status."""

    def __init__(
        self,
        backend: HypervisorBackend,
        config: VMServiceConfig,
        book: StatusBook,
        provisioner: Provisioner,
        tasks: BackgroundTasks,
        require_credits: Callable[[Identity, int, str], None],
    ) -> None:
        self.backend = backend
        self.config = config
        self.book = book
        self.provisioner = provisioner
        self.tasks = tasks
        self.require_credits = require_credits

    async def run_action(
        self, identity: Identity, vm_id: int, action: str, status: VMStatus, domain: str
    ) -> None:
        """One of start, stop, force-stop, restart (under the VM's lock)."""
        steps = {
            "start": self.start,
            "stop": self.stop,
            "force-stop": self.force_stop,
            "restart": self.restart,
        }
        await steps[action](identity, vm_id, status, domain)

    async def provision(self, vm_id: int) -> None:
        """Make a pending VM's files and domain and boot it (error with a message when
        that fails)."""
        book = self.book
        async with book.lock(vm_id):
            if await run(book.status, vm_id) is not VMStatus.pending:
                return  # destroyed (or handled) while queued
            domain = await run(book.domain_name, vm_id)
            if await run(self.backend.state, domain) is DomainState.running:
                # A crash came after the start and before the status: it is made.
                # "adopt": readiness reads this boot's console log from its start.
                await run(book.set_status, vm_id, VMStatus.running, None, "adopt")
                return
            try:
                # Never started, so nothing of the owner's is in it: whatever an interrupted
                # create left (a half-written disk or seed) is rebuilt from scratch.
                await run(self.provisioner.remove_files, domain)
                notice = await run(self.provisioner.claim_ssh_port, vm_id)
                spec = await run(self.provisioner.prepare_disks, vm_id)
                await run(self.backend.define, spec)
                await run(self.backend.start, spec.name)
            except Exception as e:
                message = e.message if isinstance(e, TwargaError) else f"{type(e).__name__}: {e}"
                log.warning("provisioning VM %s failed: %s", vm_id, message)
                await run(book.set_status, vm_id, VMStatus.error, message, "provision")
                return
            state = await run(self.backend.state, spec.name)
            await run(book.set_status, vm_id, status_for(state), notice, "boot")

    def _define_and_start_sync(self, vm_id: int) -> str | None:
        domain = self.book.domain_name(vm_id)
        running = self.backend.state(domain) is DomainState.running
        notice = None if running else self.provisioner.claim_ssh_port(vm_id)
        spec = self.provisioner.spec_for_start(vm_id)
        if not running:
            self.backend.define(spec)  # picks up RAM/CPU and port changes made while off
        self.backend.start(spec.name)
        return notice

    async def define_and_start(self, vm_id: int) -> str | None:
        """Define (with today's settings) and start a VM; returns a notice for its owner
        when its SSH port had to move, else None."""
        return await run(self._define_and_start_sync, vm_id)

    async def start(self, identity: Identity, vm_id: int, status: VMStatus, domain: str) -> None:
        if status is VMStatus.running:
            return
        await run(self.require_credits, identity, vm_id, "start")
        await run(
            self.book.set_status, vm_id, VMStatus.starting, None, "start", identity.name,
            None, f"VM start requested by {identity.name}",
        )  # fmt: skip
        try:
            if status is VMStatus.error:
                await run(self.provisioner.prepare_disks, vm_id)  # a failed create may lack disks
            notice = await self.define_and_start(vm_id)
        except TwargaError as e:
            await run(self.book.set_status, vm_id, VMStatus.error, e.message, "start")
            raise
        state = await run(self.backend.state, domain)
        await run(self.book.set_status, vm_id, status_for(state), notice, "start")

    async def stop(self, identity: Identity, vm_id: int, status: VMStatus, domain: str) -> None:
        if status in (VMStatus.stopped, VMStatus.stopping, VMStatus.error):
            return
        await run(
            self.book.set_status, vm_id, VMStatus.stopping, None, "stop", identity.name,
            None, f"VM stop requested by {identity.name}",
        )  # fmt: skip
        await run(self.backend.shutdown, domain)
        self.tasks.spawn(self.finish_stop(vm_id, domain), f"stop VM {vm_id}")

    async def finish_stop(self, vm_id: int, domain: str, then_start: bool = False) -> None:
        """Wait for the guest to power off; pull the plug after ``stop_timeout``."""
        book = self.book
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.stop_timeout
        state = await run(self.backend.state, domain)
        while state not in (DomainState.shutoff, DomainState.missing):
            if loop.time() >= deadline:
                log.info("VM %s ignored the power button; forcing it off", vm_id)
                await run(self.backend.destroy, domain)
                await run(
                    book.set_status, vm_id, VMStatus.stopping, None, "stop", None,
                    Severity.warning,
                    f"VM did not power off within {self.config.stop_timeout:g} s; forced off",
                )  # fmt: skip
                break
            await asyncio.sleep(0.25)
            state = await run(self.backend.state, domain)
        if await run(book.status, vm_id) is VMStatus.stopping:
            await run(book.set_status, vm_id, VMStatus.stopped, None, "stop")
        if then_start:
            async with book.lock(vm_id):
                if await run(book.status, vm_id) is VMStatus.stopped:
                    notice = await self.define_and_start(vm_id)
                    await run(book.set_status, vm_id, VMStatus.running, notice, "restart")

    async def force_stop(
        self, identity: Identity, vm_id: int, status: VMStatus, domain: str
    ) -> None:
        if status is VMStatus.stopped:
            return
        await run(
            self.book.set_status, vm_id, VMStatus.stopping, None, "force-stop", identity.name,
            None, f"VM forced off by {identity.name}",
        )  # fmt: skip
        await run(self.backend.destroy, domain)
        await run(self.book.set_status, vm_id, VMStatus.stopped, None, "force-stop")

    async def restart(self, identity: Identity, vm_id: int, status: VMStatus, domain: str) -> None:
        await run(self.require_credits, identity, vm_id, "restart")
        if status in (VMStatus.stopped, VMStatus.error):
            await self.start(identity, vm_id, status, domain)
            return
        await run(
            self.book.set_status, vm_id, VMStatus.stopping, None, "restart", identity.name,
            None, f"VM restart requested by {identity.name}",
        )  # fmt: skip
        await run(self.backend.shutdown, domain)
        self.tasks.spawn(self.finish_stop(vm_id, domain, then_start=True), f"restart VM {vm_id}")

    # -- destroy ------------------------------------------------------------------------

    def destroy_domain(self, domain: str) -> None:
        """Power off (if running) and undefine a domain."""
        with contextlib.suppress(NotFound):
            self.backend.destroy(domain)
        self.backend.undefine(domain)
        if isinstance(self.backend, HostPool):
            self.backend.forget(domain)  # it lives nowhere now

    def _mark_destroying(self, vm_id: int, find: Callable[[Session], VM]) -> str:
        with self.book.db.session() as session:
            vm = find(session)
            if vm.status is VMStatus.running:
                self.book.settle(session, vm)
            vm.status = VMStatus.destroying
            assert vm.domain_name is not None
            return vm.domain_name

    async def destroy(self, vm_id: int, actor: str, find: Callable[[Session], VM]) -> None:
        """Remove the domain, its disks and its seed; the row stays as history. ``find``
        gets the row in a session (and refuses with NotFound)."""
        async with self.book.lock(vm_id):
            domain = await run(self._mark_destroying, vm_id, find)
            await run(self.destroy_domain, domain)
            await run(self.provisioner.remove_files, domain)
            await run(self.book.mark_destroyed, vm_id, actor, None)
        self.book.forget(vm_id)

    async def resume_destroy(self, vm_id: int, how: str) -> None:
        """Finish a destroy that a crash (or a lost connection) interrupted."""
        async with self.book.lock(vm_id):
            if await run(self.book.status, vm_id) is not VMStatus.destroying:
                return  # finished meanwhile
            domain = await run(self.book.domain_name, vm_id)
            await run(self.destroy_domain, domain)
            await run(self.provisioner.remove_files, domain)
            note = f"destroy of VM {domain} finished ({how})"
            await run(self.book.mark_destroyed, vm_id, "system", note)
        self.book.forget(vm_id)
