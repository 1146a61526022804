"""The VM service: everything users do to VMs, composed of collaborators with one job
each: :mod:`.quota` (what may be created), :mod:`.provisioning` (files and domains),
:mod:`.lifecycle` (locks, statuses, actions), :mod:`.reconciliation` (agreeing with
libvirt) and :mod:`.views` (the JSON). This module checks ownership and wires them up.

Blocking work (database, libvirt, qemu-img) runs in worker threads; the event loop only
coordinates. Lifecycle calls are idempotent and return at once; long work moves the VM's
status (pending -> running, or error with a message).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.orm import Session
from traitlets import Float, Int, Unicode
from traitlets.config import LoggingConfigurable

from twarga_lab.db import Database
from twarga_lab.db.models import VM, VMStatus
from twarga_lab.errors import Conflict, NotFound, QuotaExceeded, TwargaError, ValidationFailed
from twarga_lab.services import Identity
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.users import UserService, lock_user
from twarga_lab.services.vms import quota, views
from twarga_lab.services.vms.cloning import Cloner
from twarga_lab.services.vms.lifecycle import ACTIONS, BackgroundTasks, Lifecycle, StatusBook
from twarga_lab.services.vms.provisioning import Provisioner
from twarga_lab.services.vms.quota import CreateRequest, VMBounds
from twarga_lab.services.vms.readiness import Readiness
from twarga_lab.services.vms.reconciliation import Reconciler
from twarga_lab.services.vms.settings import VMServiceConfig
from twarga_lab.virt.backend import HypervisorBackend
from twarga_lab.virt.domain import DomainSpec
from twarga_lab.virt.images import TINY_IMAGE, FileOwner, Image, ImageStore, qemu_account

if TYPE_CHECKING:
    from twarga_lab.schemas.vms import CloneVM, CreateVM, UpdateVM
    from twarga_lab.services.credits import CreditService

log = logging.getLogger(__name__)
T = TypeVar("T")


class VMService(LoggingConfigurable):
    """Everything users do to VMs."""

    default_image = Unicode(TINY_IMAGE, help="The image a VM gets when none is named.").tag(
        config=True
    )
    stop_timeout = Float(
        30.0, help="Seconds a guest gets to power off after the ACPI button before it is forced."
    ).tag(config=True)
    min_ram_mb = Int(VMBounds.min_ram_mb, help="Smallest RAM a VM may have, in MB.").tag(
        config=True
    )
    max_ram_mb = Int(VMBounds.max_ram_mb, help="Largest RAM a VM may have, in MB.").tag(config=True)
    min_cpu = Int(VMBounds.min_cpu, help="Fewest vCPUs a VM may have.").tag(config=True)
    max_cpu = Int(VMBounds.max_cpu, help="Most vCPUs a VM may have.").tag(config=True)
    min_disk_gb = Int(VMBounds.min_disk_gb, help="Smallest disk a VM may have, in GB.").tag(
        config=True
    )
    max_disk_gb = Int(VMBounds.max_disk_gb, help="Largest disk a VM may have, in GB.").tag(
        config=True
    )
    ssh_port_min = Int(22000, help="First 127.0.0.1 port for VMs' SSH forwards.").tag(config=True)
    ssh_port_max = Int(22999, help="Last 127.0.0.1 port for VMs' SSH forwards.").tag(config=True)

    def __init__(
        self,
        db: Database,
        backend: HypervisorBackend,
        images: ImageStore,
        users: UserService,
        *,
        vms_dir: Path,
        domain_type: str,
        domain_prefix: str,
        runs_guests: bool = True,
        **kwargs: Any,
    ) -> None:
        """``vms_dir`` (instance folders below it), ``domain_type`` (``qemu`` or ``kvm``,
        resolved) and ``domain_prefix`` are the app's; the rest is configuration."""
        super().__init__(**kwargs)
        self.db = db
        self.backend = backend
        self.images = images
        self.users = users
        self.settings = config = VMServiceConfig(
            vms_dir=Path(vms_dir),
            domain_type=domain_type,
            domain_prefix=domain_prefix,
            default_image=self.default_image,
            stop_timeout=self.stop_timeout,
            ssh_port_min=self.ssh_port_min,
            ssh_port_max=self.ssh_port_max,
            bounds=VMBounds(
                min_ram_mb=self.min_ram_mb,
                max_ram_mb=self.max_ram_mb,
                min_cpu=self.min_cpu,
                max_cpu=self.max_cpu,
                min_disk_gb=self.min_disk_gb,
                max_disk_gb=self.max_disk_gb,
            ),
            runs_guests=runs_guests,
        )
        # Bills the last seconds of a VM that stops (the app sets it; tests may leave it).
        self.billing: CreditService | None = None
        self.tasks = BackgroundTasks()
        self.book = StatusBook(db, self._settle)
        self.provisioner = Provisioner(db, images, config, qemu_account())
        self.lifecycle = Lifecycle(
            backend, config, self.book, self.provisioner, self.tasks, self.require_credits
        )
        self.reconciler = Reconciler(db, backend, config, self.book, self.lifecycle, self.tasks)
        self.cloner = Cloner(db, users, self.provisioner, backend, self.book, self.tasks)

    # -- plumbing -------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    @functools.cached_property
    def readiness(self) -> Readiness:
        """Whether running VMs' guests have booted (``"ready"`` in their JSON)."""
        return Readiness(self.db, self.images, self.provisioner.instance_dir)

    @property
    def file_owner(self) -> FileOwner | None:
        """The account instance folders and files belong to (QEMU's)."""
        return self.provisioner.file_owner

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        # None makes the service deaf to libvirt's events (tests simulate a service down).
        return self.reconciler.loop

    @_loop.setter
    def _loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.reconciler.loop = loop

    def _settle(self, session: Session, vm: VM) -> None:
        """Bill the running time since the last metering pass (``vm`` is leaving running)."""
        if self.billing is not None:
            self.billing.settle(session, vm)

    async def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait for background work to finish (used at shutdown and by tests)."""
        await self.tasks.wait(timeout)

    async def start_up(self) -> None:
        """Listen to libvirt lifecycle events, then reconcile the database with libvirt."""
        self.book.on_change = self.readiness.status_changed
        self.readiness.attach(asyncio.get_running_loop())
        hosts = self.provisioner.hosts
        if hosts is not None:
            await self._run(hosts.load)  # where each domain lives, before asking libvirt
        # Listening opens each host's connection: a round trip, off the loop.
        await self._run(self.reconciler.listen, asyncio.get_running_loop())
        await self.reconcile(reason="service start")
        await self.remove_orphans()
        await self.readiness.recover()  # VMs that ran while the service was down

    async def shut_down(self) -> None:
        """Cancel background work."""
        await self.tasks.cancel()
        await self.readiness.close()

    # -- what other services use ----------------------------------------------------

    def lock(self, vm_id: int) -> asyncio.Lock:
        """The lock held by every change of VM ``vm_id`` (snapshots take it too)."""
        return self.book.lock(vm_id)

    def require_credits(self, identity: Identity, vm_id: int, action: str) -> None:
        """Refuse to (re)start a VM whose owner has no credits left (409 no_credits)."""
        quota.require_credits(self.db, identity, vm_id, action)

    def set_status(
        self, vm_id: int, status: VMStatus, message: str | None, action: str, actor: str | None
    ) -> None:
        """Move a VM to ``status`` as ``actor`` did ``action`` (an event when it changes)."""
        self.book.set_status(vm_id, status, message, action, actor)

    def instance_dir(self, domain_name: str) -> Path:
        """Where a VM's disk, seed and console log live."""
        return self.provisioner.instance_dir(domain_name)

    def domain_spec(self, vm: VM, owner: str) -> DomainSpec:
        """The libvirt domain for a VM row (rebuilt at every start, so edits apply)."""
        return self.provisioner.domain_spec(vm, owner)

    def host_key(self, domain_name: str) -> str | None:
        """The public SSH host key of a kernel-image VM (None for VMs older than this)."""
        return self.provisioner.host_key(domain_name)

    async def reconcile(self, reason: str) -> int:
        """Make the database agree with libvirt; returns how many VMs changed."""
        return await self.reconciler.reconcile(reason)

    async def remove_orphans(self) -> list[str]:
        """Remove domains and instance folders with our prefix that no live VM owns."""
        return await self.reconciler.remove_orphans()

    # -- queries ------------------------------------------------------------------

    async def list(self, identity: Identity, all_users: bool = False) -> list[dict[str, Any]]:
        """The caller's VMs, or everyone's for an admin asking for all."""
        owner = None if all_users and identity.admin else identity.name
        return await self._run(views.list_vms, self.db, owner, self.readiness.is_ready)

    async def get(self, identity: Identity, vm_id: int) -> dict[str, Any]:
        """One VM the caller owns (or any, for an admin)."""

        def query() -> dict[str, Any]:
            with self.db.session() as session:
                vm = views.owned_vm(session, identity, vm_id)
                return views.vm_to_json(vm, vm.owner.name, ready=self.readiness.is_ready(vm))

        return await self._run(query)

    def credentials(self, identity: Identity, vm_id: int) -> dict[str, Any]:
        """How to log in to a VM (as root, or the image's default user such as twarga); its
        owner only (everyone else, admins too, 404)."""
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            if vm is None or vm.status is VMStatus.destroyed or vm.owner.name != identity.name:
                raise NotFound(f"VM {vm_id} does not exist", "no_vm")
            record_event(
                session, EventType.security, Severity.info,
                f"root credentials of VM {vm.name} read by {identity.name}",
                user_name=vm.owner.name, vm_id=vm.id, action="credentials_read",
                actor=identity.name,
            )  # fmt: skip
            username = "root"
            with contextlib.suppress(NotFound):  # an image removed since: tiny's root
                username = self.images.get(vm.image).default_user or "root"
            host_key = self.host_key(vm.domain_name) if vm.domain_name else None
            return views.credentials_view(session, vm, username, host_key)

    def list_images(self) -> list[dict[str, object]]:
        """Bootable images; ``default`` marks the one a VM gets when none is named."""
        return [
            {**image.to_json(), "default": image.name == self.settings.default_image}
            for image in self.images.list()
        ]

    # -- create -----------------------------------------------------------------------

    def validate_create(self, request: CreateVM) -> CreateRequest:
        """Check sizes and image against the settings; raises ValidationFailed (422)."""
        return quota.validate_create(
            request, self.settings.bounds, self.images, self.settings.default_image
        )

    async def create(self, identity: Identity, request: CreateVM) -> dict[str, Any]:
        """Accept a VM (status pending) and provision it in the background."""
        # Validation reads the image's files: off the event loop, like everything on disk.
        checked = await self._run(self.validate_create, request)
        user_id = await self._run(self.users.ensure, identity.name)
        image = await self._run(self.images.get, checked.image)
        try:
            vm_id = await self._run(self._insert_vm, identity, user_id, checked, image)
        except QuotaExceeded as refusal:
            await self._run(self._record_refusal, identity, checked, refusal)
            raise
        self.tasks.spawn(self.lifecycle.provision(vm_id), f"provision VM {vm_id}")
        return await self._run(views.view, self.db, vm_id, self.readiness.is_ready)

    def _insert_vm(
        self, identity: Identity, user_id: int, request: CreateRequest, image: Image
    ) -> int:
        with self.db.session() as session:
            lock_user(session, user_id)  # quota checks of this user run one at a time
            quota.check_create_quota(session, self.users, user_id, request)
            vm = self.provisioner.new_vm(session, user_id, request, image)
            record_event(
                session, EventType.vm, Severity.info,
                f"VM {vm.name} created by {identity.name}",
                user_name=views.vm_owner_name(session, vm), vm_id=vm.id, action="create",
                actor=identity.name, image=vm.image, ram=vm.ram_mb, cpu=vm.cpu, disk=vm.disk_gb,
            )  # fmt: skip
            return vm.id

    def _record_refusal(
        self, identity: Identity, request: CreateRequest, refusal: TwargaError
    ) -> None:
        with self.db.session() as session:
            record_event(
                session, EventType.vm, Severity.warning,
                f"VM {request.name} refused for {identity.name}: {refusal.message}",
                user_name=identity.name, action="create", reason=refusal.reason,
            )  # fmt: skip

    # -- clone ----------------------------------------------------------------------

    async def clone(self, identity: Identity, vm_id: int, request: CloneVM) -> dict[str, Any]:
        """Accept a copy of stopped VM ``vm_id`` (pending; stopped once its disk is copied,
        see :mod:`.cloning`): the create's quota and credit checks, for the source's owner."""
        await self.get(identity, vm_id)  # ownership, before waiting on the source's lock
        clone_id = await self.cloner.clone(identity, vm_id, request.name)
        return await self._run(views.view, self.db, clone_id, self.readiness.is_ready)

    # -- actions --------------------------------------------------------------------

    async def action(self, identity: Identity, vm_id: int, action: str) -> dict[str, Any]:
        """Run a lifecycle action; returns the VM as it is now (long work continues)."""
        if action not in ACTIONS:
            raise ValidationFailed(
                f"action must be one of {', '.join(ACTIONS)}",
                field="action",
                reason="unknown_action",
            )
        vm = await self.get(identity, vm_id)
        if action == "destroy":
            await self.destroy(identity, vm_id)
            return await self._run(views.view, self.db, vm_id, self.readiness.is_ready)
        async with self.lock(vm_id):
            vm = await self.get(identity, vm_id)
            status = VMStatus(vm["status"])
            if status is VMStatus.pending:
                if action in ("stop", "force-stop"):
                    raise Conflict(f"VM {vm['name']} is still being created", "vm_pending")
                return vm  # it starts by itself once created
            await self.lifecycle.run_action(identity, vm_id, action, status, vm["domain"])
        return await self._run(views.view, self.db, vm_id, self.readiness.is_ready)

    async def stop_all_of(self, user_name: str, reason: str) -> int:
        """Stop every running VM of ``user_name`` (for example at zero credits)."""
        system = Identity(name="system", admin=True)
        running = [
            vm
            for vm in await self.list(system, all_users=True)
            if vm["owner"] == user_name and vm["status"] == VMStatus.running.value
        ]
        for vm in running:
            log.info("stopping VM %s of %s: %s", vm["id"], user_name, reason)
            await self.action(system, vm["id"], "stop")
        return len(running)

    async def update(self, identity: Identity, vm_id: int, request: UpdateVM) -> dict[str, Any]:
        """Rename a VM, or resize RAM/CPU while it is stopped (applied at next start)."""
        quota.validate_update(request, self.settings.bounds)
        changes = request.changes()

        def work() -> None:
            with self.db.session() as session:
                vm = views.owned_vm(session, identity, vm_id)
                lock_user(session, vm.owner_id)
                if ("ram" in changes or "cpu" in changes) and vm.status is not VMStatus.stopped:
                    raise Conflict("stop the VM before changing its RAM or CPUs", "vm_not_stopped")
                if "ram" in changes:
                    quota.check_ram_change(session, self.users, vm, changes["ram"])
                if "name" in changes and changes["name"] != vm.name:
                    quota.check_name_free(session, vm.owner_id, changes["name"])
                    vm.name = changes["name"]
                vm.ram_mb = changes.get("ram", vm.ram_mb)
                vm.cpu = changes.get("cpu", vm.cpu)
                record_event(
                    session, EventType.vm, Severity.info,
                    f"VM {vm.name} changed by {identity.name}",
                    user_name=vm.owner.name, vm_id=vm.id, action="update",
                    actor=identity.name, changes=changes,
                )  # fmt: skip

        async with self.lock(vm_id):
            await self._run(work)
        return await self._run(views.view, self.db, vm_id, self.readiness.is_ready)

    async def destroy(self, identity: Identity, vm_id: int) -> None:
        """Remove the domain, its disks and its seed; the row stays as history."""
        await self.get(identity, vm_id)  # ownership, before waiting on anything
        await self.lifecycle.destroy(
            vm_id, identity.name, lambda session: views.owned_vm(session, identity, vm_id)
        )
