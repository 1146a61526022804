"""Making the database agree with libvirt: at start-up and after a reconnect (finishing
interrupted creates and destroys, marking VMs whose domain changed or vanished behind
Twarga's back), on every libvirt lifecycle event, and removing orphans (domains and
instance folders with Twarga's prefix that no live VM owns).

An unexpected change is a warning event saying it happened "outside Twarga".
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from twarga_lab.db import Database
from twarga_lab.db.models import VM, VMStatus, utcnow
from twarga_lab.errors import TwargaError
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.vms.lifecycle import (
    STATE_TO_STATUS,
    TRANSITIONAL,
    BackgroundTasks,
    Lifecycle,
    StatusBook,
)
from twarga_lab.virt.backend import DomainState, HypervisorBackend, LifecycleEvent
from twarga_lab.virt.domain import read_twarga_metadata
from twarga_lab.virt.hosts import HostPool, HostState

if TYPE_CHECKING:
    from twarga_lab.services.vms.settings import VMServiceConfig

log = logging.getLogger(__name__)
run = asyncio.to_thread


class Reconciler:
    """Applies libvirt's view of Twarga's domains to the VM rows."""

    def __init__(
        self,
        db: Database,
        backend: HypervisorBackend,
        config: VMServiceConfig,
        book: StatusBook,
        lifecycle: Lifecycle,
        tasks: BackgroundTasks,
    ) -> None:
        self.db = db
        self.backend = backend
        self.config = config
        self.book = book
        self.lifecycle = lifecycle
        self.tasks = tasks
        # The loop libvirt's events are handed to; None: deaf to them (not started yet).
        self.loop: asyncio.AbstractEventLoop | None = None

    def listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hear libvirt's lifecycle events and reconnects on ``loop`` from now on."""
        self.loop = loop
        if isinstance(self.backend, HostPool):
            # First: a host that is down already is heard when the connections open.
            self.backend.add_host_listener(self.on_host_thread)
        self.backend.add_lifecycle_listener(self.on_lifecycle_thread)
        self.backend.add_reconnect_listener(self.on_reconnect_thread)

    # -- start-up and reconnects --------------------------------------------------------

    async def reconcile(self, reason: str) -> int:
        """Make the database agree with libvirt; returns how many VMs changed."""
        states = await run(self.backend.states, self.config.domain_prefix)

        to_destroy: list[int] = []

        def work() -> tuple[int, list[int]]:
            changed = 0
            to_provision = []
            with self.db.session() as session:
                vms = session.scalars(select(VM).where(VM.status != VMStatus.destroyed)).all()
                for vm in vms:
                    if vm.status is VMStatus.pending:
                        to_provision.append(vm.id)  # interrupted while being created
                        continue
                    if vm.status is VMStatus.destroying:
                        to_destroy.append(vm.id)  # interrupted while being destroyed
                        continue
                    state = self._confirmed(
                        vm, states.get(vm.domain_name or "", DomainState.missing)
                    )
                    if self.apply_state(session, vm, state, f"found at {reason}"):
                        changed += 1
            return changed, to_provision

        changed, to_provision = await run(work)
        for vm_id in to_destroy:
            await self.lifecycle.resume_destroy(vm_id, f"found destroying at {reason}")
            changed += 1
        for vm_id in to_provision:
            self.tasks.spawn(self.lifecycle.provision(vm_id), f"provision VM {vm_id}")
        return changed

    def _confirmed(self, vm: VM, listed: DomainState) -> DomainState:
        """``listed`` (read before this session began), re-read for this one domain when
        it would change the VM: a lifecycle event applied meanwhile is newer than the
        listing and must not be undone by it. Only changes cost a round trip."""
        if vm.domain_name is None or listed is DomainState.unreachable:
            return listed
        if STATE_TO_STATUS.get(listed) is vm.status:
            return listed
        try:
            return self.backend.state(vm.domain_name)
        except TwargaError:
            return listed

    def apply_state(self, session: Session, vm: VM, state: DomainState, how: str) -> bool:
        """Move ``vm`` to what libvirt says; an unexpected change becomes an event."""
        if vm.status is VMStatus.destroying:
            return False
        if state is DomainState.missing:
            new, message = VMStatus.error, "its libvirt domain has disappeared"
        elif state is DomainState.unreachable:
            new, message = VMStatus.unknown, f"its host {vm.host} does not answer"
        else:
            new = STATE_TO_STATUS.get(state)
            if new is None:
                return False
            message = "the guest crashed" if state is DomainState.crashed else None
        if new is vm.status:
            return False
        # Back from an unreachable host, whatever it is now is news, not a surprise.
        expected = vm.status in TRANSITIONAL or vm.status is VMStatus.unknown
        previous = vm.status
        if new is VMStatus.running:
            vm.started_at = utcnow()
        elif previous is VMStatus.running:
            self.book.settle(session, vm)
        vm.status = new
        vm.status_message = message
        if self.book.on_change is not None:
            self.book.on_change(vm, previous, "reconcile")
        if new is VMStatus.unknown:
            text = f"VM {vm.name} is unknown: its host {vm.host} does not answer"
            severity = Severity.warning
        elif previous is VMStatus.unknown:
            text = f"VM {vm.name} is {new.value} (its host {vm.host} answers again)"
            severity = Severity.info
        elif expected:
            text = f"VM {vm.name} is {new.value}"
            severity = Severity.info
        else:
            text = f"VM {vm.name} went from {previous.value} to {new.value} outside Twarga ({how})"
            severity = Severity.warning
        record_event(
            session, EventType.vm, severity, text,
            user_name=vm.owner.name, vm_id=vm.id, action="reconcile",
            previous=previous.value, status=new.value, outside_twarga=not expected, detail=how,
            host=vm.host,
        )  # fmt: skip
        return True

    # -- hosts going away and coming back -----------------------------------------------

    def on_host_thread(self, host: str, state: HostState) -> None:
        """Called from a backend thread when a host is lost or answers again."""
        loop = self.loop
        if loop is None:
            return
        loop.call_soon_threadsafe(
            lambda: self.tasks.spawn(self.on_host(host, state), f"host {host} {state}")
        )

    async def on_host(self, host: str, state: HostState) -> None:
        """A lost host: an event, and its VMs are ``unknown``. One back: an event (the
        reconnect's reconciliation then gives its VMs their true status)."""
        await run(self._on_host_sync, host, state)

    def _on_host_sync(self, host: str, state: HostState) -> int:
        changed = 0
        with self.db.session() as session:
            if state is HostState.down:
                vms = session.scalars(
                    select(VM).where(
                        VM.host == host,
                        VM.status.not_in(
                            (VMStatus.destroyed, VMStatus.pending, VMStatus.destroying)
                        ),
                    )
                ).all()
                for vm in vms:
                    if self.apply_state(session, vm, DomainState.unreachable, f"host {host} lost"):
                        changed += 1
                text = f"host {host} does not answer: its {changed} VMs are unknown"
                severity = Severity.warning
            else:
                text = f"host {host} answers again"
                severity = Severity.info
            record_event(
                session, EventType.system, severity, text,
                action="host_down" if state is HostState.down else "host_up", host=host,
                vms=changed,
            )  # fmt: skip
        log.warning("%s", text)
        return changed

    # -- libvirt's events ---------------------------------------------------------------

    def on_lifecycle_thread(self, event: LifecycleEvent) -> None:
        """Called on libvirt's event thread: hop onto the service's loop."""
        loop = self.loop
        if loop is None or not event.domain.startswith(self.config.domain_prefix):
            return
        loop.call_soon_threadsafe(
            lambda: self.tasks.spawn(self.on_lifecycle(event), f"lifecycle {event}")
        )

    def on_reconnect_thread(self) -> None:
        loop = self.loop
        if loop is not None:
            loop.call_soon_threadsafe(
                lambda: self.tasks.spawn(self.reconcile("libvirt reconnect"), "reconcile")
            )

    def _on_lifecycle_sync(self, event: LifecycleEvent) -> None:
        # Events can arrive late and out of order: apply the domain's state now, and use
        # the event only for its reason.
        state = self.backend.state(event.domain)
        with self.db.session() as session:
            vm = session.scalar(
                select(VM).where(VM.domain_name == event.domain, VM.status != VMStatus.destroyed)
            )
            if vm is None or vm.status is VMStatus.pending:
                return
            if vm.status is VMStatus.stopping and state is DomainState.running:
                return  # still shutting down, or restarting
            self.apply_state(session, vm, state, f"libvirt: {event.detail}")

    async def on_lifecycle(self, event: LifecycleEvent) -> None:
        """Apply a lifecycle event's domain to its VM."""
        await run(self._on_lifecycle_sync, event)

    # -- orphans ------------------------------------------------------------------------

    def _live_domains(self) -> set[str]:
        with self.db.session() as session:
            return set(
                session.scalars(
                    select(VM.domain_name).where(
                        VM.status != VMStatus.destroyed, VM.domain_name.is_not(None)
                    )
                )
            )

    def _folders(self) -> list[Path]:
        instances = self.config.instances_dir
        if not instances.is_dir():
            return []
        return sorted(p for p in instances.iterdir() if p.is_dir())

    async def remove_orphans(self) -> list[str]:
        """Destroy and undefine domains that carry our prefix (and are Twarga's by their
        metadata or name) but have no live VM row, and remove instance folders no live VM
        owns: what a crash between libvirt and the database leaves. Each is an event."""
        prefix = self.config.domain_prefix
        states = await run(self.backend.states, prefix)
        live = await run(self._live_domains)
        removed = []
        for name in sorted(set(states) - live):
            if not await run(self.is_ours, name):
                continue
            await run(self.lifecycle.destroy_domain, name)
            await run(self.lifecycle.provisioner.remove_files, name)
            await run(
                self._record_orphan, name, f"orphan domain {name} (no VM in the database) removed"
            )
            removed.append(name)
        for folder in await run(self._folders):
            if folder.name.startswith(prefix) and folder.name not in live | set(removed):
                await run(shutil.rmtree, folder, True)
                await run(
                    self._record_orphan, folder.name,
                    f"orphan instance folder {folder.name} (no VM in the database) removed",
                )  # fmt: skip
                removed.append(folder.name)
        return removed

    def is_ours(self, domain: str) -> bool:
        """A domain Twarga made: our name shape (``<prefix><id>-<name>``) or our metadata."""
        pattern = re.escape(self.config.domain_prefix) + r"[0-9]+-[a-z][a-z0-9-]{0,62}"
        if re.fullmatch(pattern, domain):
            return True
        try:
            return bool(read_twarga_metadata(self.backend.domain_xml(domain)))
        except (TwargaError, ValueError):
            return False

    def _record_orphan(self, name: str, text: str) -> None:
        log.warning("%s", text)
        with self.db.session() as session:
            record_event(
                session, EventType.system, Severity.warning, text,
                action="orphan_removed", domain=name,
            )  # fmt: skip
