"""The VM service: validation, atomic quotas, lifecycle, background provisioning and
reconciliation of the database with the hypervisor.

Blocking work (database, libvirt, qemu-img) runs in worker threads; the event loop only
coordinates. Lifecycle calls are idempotent and return at once; long work moves the VM's
status (pending -> running, or error with a message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from twarga_lab.db import Database
from twarga_lab.db.models import VM, Event, User, VMStatus, utcnow
from twarga_lab.errors import (
    Conflict,
    NotFound,
    QuotaExceeded,
    TwargaError,
    ValidationFailed,
)
from twarga_lab.services import Identity
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.users import (
    LIVE_STATUSES,
    UserService,
    balance_milli,
    lock_user,
    usage,
)
from twarga_lab.virt.backend import DomainState, HypervisorBackend, LifecycleEvent
from twarga_lab.virt.domain import (
    SYSLOG_CHANNEL,
    ChannelSpec,
    DiskSpec,
    DomainSpec,
    UserNetSpec,
    read_twarga_metadata,
)
from twarga_lab.virt.images import (
    Image,
    ImageStore,
    build_seed_iso,
    create_overlay,
    qemu_account,
    secure_instance_dir,
)
from twarga_lab.virt.seed import (
    build_tiny_seed,
    generate_host_key,
    generate_password,
    key_fingerprint,
    sha512_crypt,
)

if TYPE_CHECKING:
    from twarga_lab.services.credits import CreditService

log = logging.getLogger(__name__)
T = TypeVar("T")

VM_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
ACTIONS = ("start", "stop", "restart", "destroy", "force-stop")
GUEST_IP = "10.0.2.15"  # QEMU user networking always leases this address to the guest
TINY_SEED = "twarga-seed.iso"  # kernel images' seed: root's keys and password hash
HOST_KEY_PUB = "ssh_host_ed25519_key.pub"  # the public half of the host key on the seed

# Statuses Twarga sets itself around its own calls: a libvirt event seen in one of them
# is the expected outcome; seen in any other status, something acted behind our back.
TRANSITIONAL = {
    VMStatus.pending,
    VMStatus.starting,
    VMStatus.stopping,
    VMStatus.destroying,
}

_STATE_TO_STATUS = {
    DomainState.running: VMStatus.running,
    DomainState.paused: VMStatus.paused,
    DomainState.shutting_down: VMStatus.stopping,
    DomainState.shutoff: VMStatus.stopped,
    DomainState.crashed: VMStatus.error,
}


@dataclass(frozen=True)
class VMBounds:
    """Per-VM size limits."""

    min_ram_mb: int = 512
    max_ram_mb: int = 4096
    min_cpu: int = 1
    max_cpu: int = 4
    min_disk_gb: int = 10
    max_disk_gb: int = 100


@dataclass(frozen=True)
class VMServiceConfig:
    """What the VM service needs from the application's settings."""

    vms_dir: Path
    domain_type: str = "qemu"
    domain_prefix: str = "twarga-"
    default_image: str = "twarga/tiny"
    stop_timeout: float = 30.0
    ssh_port_min: int = 22000
    ssh_port_max: int = 22999
    bounds: VMBounds = field(default_factory=VMBounds)

    @property
    def instances_dir(self) -> Path:
        return self.vms_dir / "instances"


@dataclass(frozen=True)
class CreateRequest:
    name: str
    image: str
    ram: int
    cpu: int
    disk: int


def uptime_seconds(vm: VM, now: datetime) -> int:
    """Seconds since the VM last started, 0 when it is not running."""
    if vm.status is not VMStatus.running or vm.started_at is None:
        return 0
    return max(0, int((now - vm.started_at).total_seconds()))


def vm_to_json(vm: VM, owner: str, now: datetime | None = None) -> dict[str, Any]:
    """The public view of a VM."""
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
    }


def validate_name(name: str) -> str:
    """A VM name as DESIGN.md allows it, or ValidationFailed."""
    if not VM_NAME_RE.fullmatch(name):
        raise ValidationFailed(
            "name must be 1-63 characters: a lowercase letter, then lowercase letters, "
            "digits or hyphens",
            field="name",
            reason="invalid_name",
        )
    return name


def requested_image(body: dict[str, Any]) -> str | None:
    """The image a create body names: ``image``, or the seed's ``os_type`` (its alias).

    Both given and different is a contradiction the caller must resolve (422)."""
    image, os_type = body.get("image"), body.get("os_type")
    if image and os_type and image != os_type:
        raise ValidationFailed(
            f"'image' ({image!r}) and its alias 'os_type' ({os_type!r}) name different images; "
            "send one of them",
            field="os_type",
            reason="conflicting_fields",
        )
    return image or os_type


def _check_range(value: int, low: int, high: int, field_name: str, unit: str) -> int:
    if not low <= value <= high:
        raise ValidationFailed(
            f"{field_name} must be between {low} and {high} {unit}, not {value}",
            field=field_name,
            reason="out_of_range",
        )
    return value


class VMService:
    """Everything users do to VMs."""

    def __init__(
        self,
        db: Database,
        backend: HypervisorBackend,
        images: ImageStore,
        users: UserService,
        config: VMServiceConfig,
    ) -> None:
        self.db = db
        self.backend = backend
        self.images = images
        self.users = users
        self.config = config
        # Bills the last seconds of a VM that stops (the app sets it; tests may leave it).
        self.billing: CreditService | None = None
        # Instance folders and files belong to the account libvirt runs QEMU as, 0700/0600.
        self.file_owner = qemu_account()
        self._locks: dict[int, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- plumbing -------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def _lock(self, vm_id: int) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def _spawn(self, coro: Any, what: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %s failed", what, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait for background work to finish (used at shutdown and by tests)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def start_up(self) -> None:
        """Listen to libvirt lifecycle events, then reconcile the database with libvirt."""
        self._loop = asyncio.get_running_loop()
        self.backend.add_lifecycle_listener(self._on_lifecycle_thread)
        self.backend.add_reconnect_listener(self._on_reconnect_thread)
        await self.reconcile(reason="service start")
        await self.remove_orphans()

    async def shut_down(self) -> None:
        """Cancel background work."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    def _get_owned(self, session: Session, identity: Identity, vm_id: int) -> VM:
        vm = session.get(VM, vm_id)
        if vm is None or vm.status is VMStatus.destroyed:
            raise NotFound(f"VM {vm_id} does not exist", "no_vm")
        if not identity.admin and vm.owner.name != identity.name:
            # Someone else's VM is indistinguishable from no VM at all.
            raise NotFound(f"VM {vm_id} does not exist", "no_vm")
        return vm

    def _view(self, vm_id: int) -> dict[str, Any]:
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            if vm is None:
                raise NotFound(f"VM {vm_id} does not exist", "no_vm")
            return vm_to_json(vm, vm.owner.name)

    # -- queries ------------------------------------------------------------------

    async def list(self, identity: Identity, all_users: bool = False) -> list[dict[str, Any]]:
        """The caller's VMs, or everyone's for an admin asking for all."""

        def query() -> list[dict[str, Any]]:
            with self.db.session() as session:
                stmt = (
                    select(VM, User.name)
                    .join(User, VM.owner_id == User.id)
                    .where(VM.status != VMStatus.destroyed)
                    .order_by(VM.id)
                )
                if not (all_users and identity.admin):
                    stmt = stmt.where(User.name == identity.name)
                now = utcnow()
                return [vm_to_json(vm, owner, now) for vm, owner in session.execute(stmt)]

        return await self._run(query)

    async def get(self, identity: Identity, vm_id: int) -> dict[str, Any]:
        """One VM the caller owns (or any, for an admin)."""

        def query() -> dict[str, Any]:
            with self.db.session() as session:
                vm = self._get_owned(session, identity, vm_id)
                return vm_to_json(vm, vm.owner.name)

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
            result: dict[str, Any] = {
                "username": username,
                "password": vm.root_password,
                "ssh_host": "127.0.0.1",
                "ssh_port": vm.ssh_port,
                "ssh_port_moved": None,
            }
            # What the guest's SSH server must present (compare before typing a password).
            host_key = self.host_key(vm.domain_name) if vm.domain_name else None
            result["ssh_host_key"] = host_key
            result["ssh_host_key_fingerprint"] = key_fingerprint(host_key) if host_key else None
            moved = session.scalar(
                select(Event)
                .where(
                    Event.vm_id == vm.id, Event.details["action"].as_string() == "ssh_port_moved"
                )
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

    def list_images(self) -> list[dict[str, object]]:
        """Bootable images; ``default`` marks the one a VM gets when none is named."""
        return [
            {**image.to_json(), "default": image.name == self.config.default_image}
            for image in self.images.list()
        ]

    # -- create -----------------------------------------------------------------------

    def validate_create(self, body: dict[str, Any]) -> CreateRequest:
        """Check values (types are the handler's job); raises ValidationFailed (422)."""
        b = self.config.bounds
        name = validate_name(body["name"])
        image_name = requested_image(body) or self.config.default_image
        try:
            image = self.images.get(image_name)
        except NotFound:
            raise ValidationFailed(
                f"image {image_name!r} does not exist; GET /twarga/api/images lists them",
                field="image" if body.get("image") else "os_type",
                reason="unknown_image",
            ) from None
        ram = _check_range(body.get("ram", b.min_ram_mb), b.min_ram_mb, b.max_ram_mb, "ram", "MB")
        cpu = _check_range(body.get("cpu", b.min_cpu), b.min_cpu, b.max_cpu, "cpu", "vCPUs")
        disk = _check_range(
            body.get("disk", max(b.min_disk_gb, image.min_disk_gb)),
            max(b.min_disk_gb, image.min_disk_gb),
            b.max_disk_gb,
            "disk",
            "GB",
        )
        return CreateRequest(name=name, image=image.name, ram=ram, cpu=cpu, disk=disk)

    async def create(self, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        """Accept a VM (status pending) and provision it in the background."""
        # Validation reads the image's files: off the event loop, like everything on disk.
        request = await self._run(self.validate_create, body)
        user_id = await self._run(self.users.ensure, identity.name)
        image = await self._run(self.images.get, request.image)
        try:
            vm_id = await self._run(self._insert_vm, identity, user_id, request, image)
        except QuotaExceeded as refusal:
            await self._run(self._record_refusal, identity, request, refusal)
            raise
        self._spawn(self._provision(vm_id), f"provision VM {vm_id}")
        return await self._run(self._view, vm_id)

    def _insert_vm(
        self, identity: Identity, user_id: int, request: CreateRequest, image: Image
    ) -> int:
        with self.db.session() as session:
            lock_user(session, user_id)  # quota checks of this user run one at a time
            taken = session.scalar(
                select(VM.id).where(
                    VM.owner_id == user_id,
                    VM.name == request.name,
                    VM.status.in_(LIVE_STATUSES),
                )
            )
            if taken is not None:
                raise Conflict(f"you already have a VM named {request.name!r}", "name_taken")
            if balance_milli(session, user_id) <= 0:
                raise QuotaExceeded("you have no credits left; ask an admin for more", "no_credits")
            quota = self.users.effective_quota(session, user_id)
            used = usage(session, user_id)
            if used.vms + 1 > quota.max_vms:
                raise QuotaExceeded(
                    f"you may have at most {quota.max_vms} VMs and have {used.vms}",
                    "quota_exceeded",
                )
            if used.ram_mb + request.ram > quota.max_ram_mb:
                raise QuotaExceeded(
                    f"{request.ram} MB more RAM would exceed your quota of "
                    f"{quota.max_ram_mb} MB ({used.ram_mb} MB in use)",
                    "quota_exceeded",
                )
            if quota.max_cpu is not None and used.cpu + request.cpu > quota.max_cpu:
                raise QuotaExceeded(
                    f"{request.cpu} more vCPUs would exceed your quota of {quota.max_cpu}",
                    "quota_exceeded",
                )
            if quota.max_disk_gb is not None and used.disk_gb + request.disk > quota.max_disk_gb:
                raise QuotaExceeded(
                    f"{request.disk} GB more disk would exceed your quota of "
                    f"{quota.max_disk_gb} GB",
                    "quota_exceeded",
                )
            vm = VM(
                owner_id=user_id,
                name=request.name,
                image=request.image,
                os_type=image.os_type,
                ram_mb=request.ram,
                cpu=request.cpu,
                disk_gb=request.disk,
                status=VMStatus.pending,
                ssh_port=self._free_ssh_port(session),
                ip_address=GUEST_IP,
                # tiny's root, a cloud image's default user (its seed has only the hash)
                root_password=generate_password()
                if image.kind == "kernel" or image.cloud_init
                else None,
            )
            session.add(vm)
            session.flush()
            vm.domain_name = f"{self.config.domain_prefix}{vm.id}-{vm.name}"
            record_event(
                session,
                EventType.vm,
                Severity.info,
                f"VM {vm.name} created by {identity.name}",
                user_name=vm_owner_name(session, vm),
                vm_id=vm.id,
                action="create",
                actor=identity.name,
                image=vm.image,
                ram=vm.ram_mb,
                cpu=vm.cpu,
                disk=vm.disk_gb,
            )
            return vm.id

    def _free_ssh_port(self, session: Session) -> int:
        # Ports of live VMs are taken; the partial unique index backs this up.
        used = set(
            session.scalars(
                select(VM.ssh_port).where(VM.status.in_(LIVE_STATUSES), VM.ssh_port.is_not(None))
            )
        )
        for port in range(self.config.ssh_port_min, self.config.ssh_port_max + 1):
            if port not in used and port_is_free(port):
                return port
        raise QuotaExceeded("no SSH port is free on this host", "no_ports")

    def _record_refusal(
        self, identity: Identity, request: CreateRequest, refusal: TwargaError
    ) -> None:
        with self.db.session() as session:
            record_event(
                session,
                EventType.vm,
                Severity.warning,
                f"VM {request.name} refused for {identity.name}: {refusal.message}",
                user_name=identity.name,
                action="create",
                reason=refusal.reason,
            )

    # -- provisioning -------------------------------------------------------------------

    def instance_dir(self, domain_name: str) -> Path:
        """Where a VM's disk, seed and console log live."""
        return self.config.instances_dir / domain_name

    def domain_spec(self, vm: VM, owner: str) -> DomainSpec:
        """The libvirt domain for a VM row (rebuilt at every start, so edits apply)."""
        assert vm.domain_name is not None
        image = self.images.get(vm.image)
        folder = self.instance_dir(vm.domain_name)
        disks = [DiskSpec(path=folder / "disk.qcow2", target="vda")]
        if image.cloud_init:
            disks.append(
                DiskSpec(
                    path=folder / "seed.iso", target="hdc", format="raw", device="cdrom", bus="ide"
                )
            )
        cmdline: tuple[tuple[str, str], ...] = ()
        channels: tuple[ChannelSpec, ...] = ()
        if image.kind == "kernel":
            cmdline = (
                ("console", "ttyS0"),
                ("quiet", ""),
                ("twarga.name", vm.name),
                ("twarga.ssh", "1"),
            )
            disks.append(
                DiskSpec(path=folder / TINY_SEED, target="vdb", format="raw", readonly=True)
            )
            channels = (ChannelSpec(SYSLOG_CHANNEL),)  # libvirt picks the socket's path
        elif image.kernel is not None:
            cmdline = image.cmdline  # a disk image with its own kernel (debian/12)
        if image.cloud_init:
            channels = (ChannelSpec(SYSLOG_CHANNEL),)  # the seed's rsyslog writes into it
        return DomainSpec(
            name=vm.domain_name,
            memory_mib=vm.ram_mb,
            vcpus=vm.cpu,
            domain_type=self.config.domain_type,
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=cmdline,
            disks=tuple(disks),
            console_log=folder / "console.log",
            network=UserNetSpec(ssh_host_port=vm.ssh_port),
            channels=channels,
            owner=owner,
            vm_id=vm.id,
        )

    def _prepare_disks(self, vm_id: int) -> DomainSpec:
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            assert vm is not None and vm.domain_name is not None
            owner = vm.owner
            spec = self.domain_spec(vm, owner.name)
            image = self.images.get(vm.image)
            folder = self.instance_dir(vm.domain_name)
            if folder.is_dir():
                for partial in folder.glob(".*.tmp"):
                    partial.unlink()  # an interrupted write; the real file was never renamed
            disk = folder / "disk.qcow2"
            if not disk.exists():
                create_overlay(image.base_disk, disk, vm.disk_gb)
            if image.cloud_init and not (folder / "seed.iso").exists():
                build_seed_iso(
                    folder / "seed.iso",
                    instance_id=vm.domain_name,
                    hostname=vm.name,
                    ssh_keys=[owner.ssh_public_key] if owner.ssh_public_key else [],
                    user=image.default_user or "twarga",
                    password_hash=sha512_crypt(vm.root_password) if vm.root_password else None,
                    syslog_channel=SYSLOG_CHANNEL,
                )
            self._ensure_tiny_seed(vm, image)
            self._secure(folder)
            return spec

    def _secure(self, folder: Path) -> None:
        """Only QEMU's account (and root) may read a VM's disk, seeds and console log."""
        instances = self.config.instances_dir
        instances.mkdir(parents=True, exist_ok=True)
        instances.chmod(0o711)  # others may pass through to their VMs' disks, not list them
        secure_instance_dir(folder, self.file_owner)

    def _ensure_tiny_seed(self, vm: VM, image: Image) -> None:
        """A kernel image's seed disk: the owner's key, root's password hash (never the
        kernel command line, which anyone reading the domain XML sees) and the guest's SSH
        host key, whose public half is kept beside it for the owner."""
        assert vm.domain_name is not None
        folder = self.instance_dir(vm.domain_name)
        seed = folder / TINY_SEED
        if image.kind != "kernel" or seed.exists():
            return
        key = vm.owner.ssh_public_key
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="twarga-hostkey-") as tmp:
            private = Path(tmp) / "host_key"
            public = generate_host_key(private)
            build_tiny_seed(
                seed,
                authorized_keys=[key] if key else [],
                root_password_hash=sha512_crypt(vm.root_password) if vm.root_password else None,
                host_key=private,
            )
        partial = folder / f".{HOST_KEY_PUB}.tmp"
        partial.write_text(public + "\n")
        os.replace(partial, folder / HOST_KEY_PUB)

    def host_key(self, domain_name: str) -> str | None:
        """The public SSH host key of a kernel-image VM (None for VMs older than this)."""
        try:
            return (self.instance_dir(domain_name) / HOST_KEY_PUB).read_text().strip() or None
        except OSError:
            return None

    async def _provision(self, vm_id: int) -> None:
        async with self._lock(vm_id):
            status = await self._run(self._status, vm_id)
            if status is not VMStatus.pending:
                return  # destroyed (or handled) while queued
            domain = await self._run(self._domain_name, vm_id)
            if await self._run(self.backend.state, domain) is DomainState.running:
                # A crash came after the start and before the status: it is made.
                await self._run(self._set_status, vm_id, VMStatus.running, None, "boot")
                return
            try:
                # Never started, so nothing of the owner's is in it: whatever an interrupted
                # create left (a half-written disk or seed) is rebuilt from scratch.
                await self._run(shutil.rmtree, self.instance_dir(domain), True)
                notice = await self._run(self._claim_ssh_port, vm_id)
                spec = await self._run(self._prepare_disks, vm_id)
                await self._run(self.backend.define, spec)
                await self._run(self.backend.start, spec.name)
            except Exception as e:
                message = e.message if isinstance(e, TwargaError) else f"{type(e).__name__}: {e}"
                log.warning("provisioning VM %s failed: %s", vm_id, message)
                await self._run(self._set_status, vm_id, VMStatus.error, message, "provision")
                return
            state = await self._run(self.backend.state, spec.name)
            await self._run(
                self._set_status, vm_id, _STATE_TO_STATUS.get(state, VMStatus.error), notice, "boot"
            )

    def _settle(self, session: Session, vm: VM) -> None:
        """Bill the running time since the last metering pass (``vm`` is leaving running)."""
        if self.billing is not None:
            self.billing.settle(session, vm)

    def _require_credits(self, identity: Identity, vm_id: int, action: str) -> None:
        """Refuse to (re)start a VM whose owner has no credits left (409 no_credits)."""
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            assert vm is not None
            if balance_milli(session, vm.owner_id) > 0:
                return
            name, owner = vm.name, vm.owner.name
        with self.db.session() as session:
            record_event(
                session, EventType.vm, Severity.warning,
                f"{action} of VM {name} refused for {identity.name}: {owner} has no credits",
                user_name=owner, vm_id=vm_id, action=action, actor=identity.name,
                reason="no_credits",
            )  # fmt: skip
        raise QuotaExceeded(
            f"{owner} has no credits left; ask an admin for more before starting VM {name}",
            "no_credits",
        )

    def _status(self, vm_id: int) -> VMStatus | None:
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            return vm.status if vm is not None else None

    def _set_status(
        self,
        vm_id: int,
        status: VMStatus,
        message: str | None,
        action: str,
        actor: str | None = None,
        severity: Severity | None = None,
        note: str | None = None,
    ) -> None:
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            if vm is None or vm.status is VMStatus.destroyed:
                return
            previous = vm.status
            if status is VMStatus.running and previous is not VMStatus.running:
                vm.started_at = utcnow()
            if previous is VMStatus.running and status is not VMStatus.running:
                self._settle(session, vm)
            vm.status = status
            vm.status_message = message
            if previous is status and note is None:
                return
            text = note or f"VM {vm.name} is {status.value}" + (f": {message}" if message else "")
            if severity is None:
                severity = Severity.warning if status is VMStatus.error else Severity.info
            record_event(
                session,
                EventType.vm,
                severity,
                text,
                user_name=vm.owner.name,
                vm_id=vm.id,
                action=action,
                actor=actor,
                previous=previous.value,
                status=status.value,
            )

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
            return await self._run(self._view, vm_id)
        async with self._lock(vm_id):
            vm = await self.get(identity, vm_id)
            status = VMStatus(vm["status"])
            domain = vm["domain"]
            if status is VMStatus.pending:
                if action in ("stop", "force-stop"):
                    raise Conflict(f"VM {vm['name']} is still being created", "vm_pending")
                return vm  # it starts by itself once created
            if action == "start":
                await self._start(identity, vm_id, status, domain)
            elif action == "stop":
                await self._stop(identity, vm_id, status, domain)
            elif action == "force-stop":
                await self._force_stop(identity, vm_id, status, domain)
            elif action == "restart":
                await self._restart(identity, vm_id, status, domain)
        return await self._run(self._view, vm_id)

    async def _define_and_start(self, vm_id: int) -> str | None:
        """Define (with today's settings) and start a VM; returns a notice for its owner
        when its SSH port had to move, else None."""

        def work() -> str | None:
            with self.db.session() as session:
                vm = session.get(VM, vm_id)
                assert vm is not None and vm.domain_name is not None
                running = self.backend.state(vm.domain_name) is DomainState.running
            notice = None if running else self._claim_ssh_port(vm_id)
            with self.db.session() as session:
                vm = session.get(VM, vm_id)
                assert vm is not None
                spec = self.domain_spec(vm, vm.owner.name)
                self._ensure_tiny_seed(vm, self.images.get(vm.image))  # VMs older than seeds
                self._secure(self.instance_dir(spec.name))  # and VMs older than this check
            if not running:
                self.backend.define(spec)  # picks up RAM/CPU and port changes made while off
            self.backend.start(spec.name)
            return notice

        return await self._run(work)

    def _claim_ssh_port(self, vm_id: int) -> str | None:
        """Before a start: if another program listens on the VM's SSH forward port (a
        local account could squat it while the VM is off and collect the owner's password
        with a fake SSH server), move the VM to a free port, record a security event and
        return a notice for the owner; None when the port is still the VM's."""
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            assert vm is not None
            old = vm.ssh_port
            if old is None or port_is_free(old):
                return None
            lock_user(session, vm.owner_id)
            new = self._free_ssh_port(session)
            vm.ssh_port = new
            notice = (
                f"SSH moved from port {old} (another program was listening there) to {new}; "
                "connect to the new port and check the VM's host key"
            )
            record_event(
                session, EventType.security, Severity.warning,
                f"SSH port {old} of VM {vm.name} was taken by another program; "
                f"the VM now forwards 127.0.0.1:{new}",
                user_name=vm.owner.name, vm_id=vm.id, action="ssh_port_moved",
                previous_port=old, port=new,
            )  # fmt: skip
            log.warning("VM %s: SSH port %s is taken, moved to %s", vm_id, old, new)
            return notice

    async def _start(self, identity: Identity, vm_id: int, status: VMStatus, domain: str) -> None:
        if status is VMStatus.running:
            return
        await self._run(self._require_credits, identity, vm_id, "start")
        await self._run(
            self._set_status,
            vm_id,
            VMStatus.starting,
            None,
            "start",
            identity.name,
            None,
            f"VM start requested by {identity.name}",
        )
        try:
            if status is VMStatus.error:
                await self._run(self._prepare_disks, vm_id)  # a failed create may lack disks
            notice = await self._define_and_start(vm_id)
        except TwargaError as e:
            await self._run(self._set_status, vm_id, VMStatus.error, e.message, "start")
            raise
        state = await self._run(self.backend.state, domain)
        await self._run(
            self._set_status, vm_id, _STATE_TO_STATUS.get(state, VMStatus.error), notice, "start"
        )

    async def _stop(self, identity: Identity, vm_id: int, status: VMStatus, domain: str) -> None:
        if status in (VMStatus.stopped, VMStatus.stopping, VMStatus.error):
            return
        await self._run(
            self._set_status,
            vm_id,
            VMStatus.stopping,
            None,
            "stop",
            identity.name,
            None,
            f"VM stop requested by {identity.name}",
        )
        await self._run(self.backend.shutdown, domain)
        self._spawn(self._finish_stop(vm_id, domain), f"stop VM {vm_id}")

    async def _finish_stop(self, vm_id: int, domain: str, then_start: bool = False) -> None:
        """Wait for the guest to power off; pull the plug after ``stop_timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.stop_timeout
        state = await self._run(self.backend.state, domain)
        while state not in (DomainState.shutoff, DomainState.missing):
            if loop.time() >= deadline:
                log.info("VM %s ignored the power button; forcing it off", vm_id)
                await self._run(self.backend.destroy, domain)
                await self._run(
                    self._set_status,
                    vm_id,
                    VMStatus.stopping,
                    None,
                    "stop",
                    None,
                    Severity.warning,
                    f"VM did not power off within {self.config.stop_timeout:g} s; forced off",
                )
                break
            await asyncio.sleep(0.25)
            state = await self._run(self.backend.state, domain)
        if await self._run(self._status, vm_id) is VMStatus.stopping:
            await self._run(self._set_status, vm_id, VMStatus.stopped, None, "stop")
        if then_start:
            async with self._lock(vm_id):
                if await self._run(self._status, vm_id) is VMStatus.stopped:
                    notice = await self._define_and_start(vm_id)
                    await self._run(self._set_status, vm_id, VMStatus.running, notice, "restart")

    async def _force_stop(
        self, identity: Identity, vm_id: int, status: VMStatus, domain: str
    ) -> None:
        if status is VMStatus.stopped:
            return
        await self._run(
            self._set_status,
            vm_id,
            VMStatus.stopping,
            None,
            "force-stop",
            identity.name,
            None,
            f"VM forced off by {identity.name}",
        )
        await self._run(self.backend.destroy, domain)
        await self._run(self._set_status, vm_id, VMStatus.stopped, None, "force-stop")

    async def _restart(self, identity: Identity, vm_id: int, status: VMStatus, domain: str) -> None:
        await self._run(self._require_credits, identity, vm_id, "restart")
        if status in (VMStatus.stopped, VMStatus.error):
            await self._start(identity, vm_id, status, domain)
            return
        await self._run(
            self._set_status,
            vm_id,
            VMStatus.stopping,
            None,
            "restart",
            identity.name,
            None,
            f"VM restart requested by {identity.name}",
        )
        await self._run(self.backend.shutdown, domain)
        self._spawn(self._finish_stop(vm_id, domain, then_start=True), f"restart VM {vm_id}")

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

    # -- update -------------------------------------------------------------------------

    async def update(
        self, identity: Identity, vm_id: int, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Rename a VM, or resize RAM/CPU while it is stopped (applied at next start)."""
        b = self.config.bounds
        if "name" in changes:
            validate_name(changes["name"])
        if "ram" in changes:
            _check_range(changes["ram"], b.min_ram_mb, b.max_ram_mb, "ram", "MB")
        if "cpu" in changes:
            _check_range(changes["cpu"], b.min_cpu, b.max_cpu, "cpu", "vCPUs")

        def work() -> None:
            with self.db.session() as session:
                vm = self._get_owned(session, identity, vm_id)
                lock_user(session, vm.owner_id)
                if ("ram" in changes or "cpu" in changes) and vm.status is not VMStatus.stopped:
                    raise Conflict("stop the VM before changing its RAM or CPUs", "vm_not_stopped")
                if "ram" in changes:
                    quota = self.users.effective_quota(session, vm.owner_id)
                    used = usage(session, vm.owner_id)
                    if used.ram_mb - vm.ram_mb + changes["ram"] > quota.max_ram_mb:
                        raise QuotaExceeded(
                            f"{changes['ram']} MB would exceed the RAM quota of "
                            f"{quota.max_ram_mb} MB",
                            "quota_exceeded",
                        )
                if "name" in changes and changes["name"] != vm.name:
                    taken = session.scalar(
                        select(VM.id).where(
                            VM.owner_id == vm.owner_id,
                            VM.name == changes["name"],
                            VM.status.in_(LIVE_STATUSES),
                        )
                    )
                    if taken is not None:
                        raise Conflict(
                            f"you already have a VM named {changes['name']!r}", "name_taken"
                        )
                    vm.name = changes["name"]
                vm.ram_mb = changes.get("ram", vm.ram_mb)
                vm.cpu = changes.get("cpu", vm.cpu)
                record_event(
                    session,
                    EventType.vm,
                    Severity.info,
                    f"VM {vm.name} changed by {identity.name}",
                    user_name=vm.owner.name,
                    vm_id=vm.id,
                    action="update",
                    actor=identity.name,
                    changes=changes,
                )

        async with self._lock(vm_id):
            await self._run(work)
        return await self._run(self._view, vm_id)

    # -- destroy ------------------------------------------------------------------------

    async def destroy(self, identity: Identity, vm_id: int) -> None:
        """Remove the domain, its disks and its seed; the row stays as history."""
        await self.get(identity, vm_id)  # ownership, before waiting on anything

        def mark() -> str:
            with self.db.session() as session:
                vm = self._get_owned(session, identity, vm_id)
                if vm.status is VMStatus.running:
                    self._settle(session, vm)
                vm.status = VMStatus.destroying
                assert vm.domain_name is not None
                return vm.domain_name

        async with self._lock(vm_id):
            domain = await self._run(mark)
            await self._run(self._destroy_domain, domain)
            await self._run(shutil.rmtree, self.instance_dir(domain), True)
            await self._run(self._mark_destroyed, vm_id, identity.name, None)
        self._locks.pop(vm_id, None)

    def _mark_destroyed(self, vm_id: int, actor: str, note: str | None) -> None:
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            assert vm is not None
            vm.status = VMStatus.destroyed
            vm.destroyed_at = utcnow()
            vm.status_message = None
            record_event(
                session,
                EventType.vm,
                Severity.info,
                note or f"VM {vm.name} destroyed by {actor}",
                user_name=vm.owner.name,
                vm_id=vm.id,
                action="destroy",
                actor=actor,
            )

    async def _resume_destroy(self, vm_id: int, how: str) -> None:
        """Finish a destroy that a crash (or a lost connection) interrupted."""
        async with self._lock(vm_id):
            if await self._run(self._status, vm_id) is not VMStatus.destroying:
                return  # finished meanwhile
            domain = await self._run(lambda: self._domain_name(vm_id))
            await self._run(self._destroy_domain, domain)
            await self._run(shutil.rmtree, self.instance_dir(domain), True)
            await self._run(
                self._mark_destroyed, vm_id, "system", f"destroy of VM {domain} finished ({how})"
            )
        self._locks.pop(vm_id, None)

    def _domain_name(self, vm_id: int) -> str:
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            assert vm is not None and vm.domain_name is not None
            return vm.domain_name

    async def remove_orphans(self) -> list[str]:
        """Destroy and undefine domains that carry our prefix (and are Twarga's by their
        metadata or name) but have no live VM row, and remove instance folders no live VM
        owns: what a crash between libvirt and the database leaves. Each is an event."""
        prefix = self.config.domain_prefix
        states = await self._run(self.backend.states, prefix)

        def live_domains() -> set[str]:
            with self.db.session() as session:
                return set(
                    session.scalars(
                        select(VM.domain_name).where(
                            VM.status != VMStatus.destroyed, VM.domain_name.is_not(None)
                        )
                    )
                )

        live = await self._run(live_domains)
        removed = []
        for name in sorted(set(states) - live):
            if not await self._run(self._is_ours, name):
                continue
            await self._run(self._destroy_domain, name)
            await self._run(shutil.rmtree, self.instance_dir(name), True)
            await self._run(
                self._record_orphan, name, f"orphan domain {name} (no VM in the database) removed"
            )
            removed.append(name)
        instances = self.config.instances_dir

        def folders_there() -> list[Path]:
            if not instances.is_dir():
                return []
            return sorted(p for p in instances.iterdir() if p.is_dir())

        folders = await self._run(folders_there)
        for folder in folders:
            if folder.name.startswith(prefix) and folder.name not in live | set(removed):
                await self._run(shutil.rmtree, folder, True)
                await self._run(
                    self._record_orphan, folder.name,
                    f"orphan instance folder {folder.name} (no VM in the database) removed",
                )  # fmt: skip
                removed.append(folder.name)
        return removed

    def _is_ours(self, domain: str) -> bool:
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

    def _destroy_domain(self, domain: str) -> None:
        with contextlib.suppress(NotFound):
            self.backend.destroy(domain)
        self.backend.undefine(domain)

    # -- reconciliation -----------------------------------------------------------------

    async def reconcile(self, reason: str) -> int:
        """Make the database agree with libvirt; returns how many VMs changed."""
        states = await self._run(self.backend.states, self.config.domain_prefix)

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
                    state = states.get(vm.domain_name or "", DomainState.missing)
                    if self._apply_state(session, vm, state, f"found at {reason}"):
                        changed += 1
            return changed, to_provision

        changed, to_provision = await self._run(work)
        for vm_id in to_destroy:
            await self._resume_destroy(vm_id, f"found destroying at {reason}")
            changed += 1
        for vm_id in to_provision:
            self._spawn(self._provision(vm_id), f"provision VM {vm_id}")
        return changed

    def _apply_state(self, session: Session, vm: VM, state: DomainState, how: str) -> bool:
        """Move ``vm`` to what libvirt says; an unexpected change becomes an event."""
        if vm.status is VMStatus.destroying:
            return False
        if state is DomainState.missing:
            new, message = VMStatus.error, "its libvirt domain has disappeared"
        else:
            new = _STATE_TO_STATUS.get(state)
            if new is None:
                return False
            message = "the guest crashed" if state is DomainState.crashed else None
        if new is vm.status:
            return False
        expected = vm.status in TRANSITIONAL
        previous = vm.status
        if new is VMStatus.running:
            vm.started_at = utcnow()
        elif previous is VMStatus.running:
            self._settle(session, vm)
        vm.status = new
        vm.status_message = message
        if expected:
            text = f"VM {vm.name} is {new.value}"
            severity = Severity.info
        else:
            text = f"VM {vm.name} went from {previous.value} to {new.value} outside Twarga ({how})"
            severity = Severity.warning
        record_event(
            session,
            EventType.vm,
            severity,
            text,
            user_name=vm.owner.name,
            vm_id=vm.id,
            action="reconcile",
            previous=previous.value,
            status=new.value,
            outside_twarga=not expected,
            detail=how,
        )
        return True

    def _on_lifecycle_thread(self, event: LifecycleEvent) -> None:
        # Called on libvirt's event thread: hop onto the service's loop.
        if self._loop is None or not event.domain.startswith(self.config.domain_prefix):
            return
        self._loop.call_soon_threadsafe(
            lambda: self._spawn(self._on_lifecycle(event), f"lifecycle {event}")
        )

    def _on_reconnect_thread(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(
                lambda: self._spawn(self.reconcile("libvirt reconnect"), "reconcile")
            )

    async def _on_lifecycle(self, event: LifecycleEvent) -> None:
        def work() -> None:
            # Events can arrive late and out of order: apply the domain's state now, and use
            # the event only for its reason.
            state = self.backend.state(event.domain)
            with self.db.session() as session:
                vm = session.scalar(
                    select(VM).where(
                        VM.domain_name == event.domain, VM.status != VMStatus.destroyed
                    )
                )
                if vm is None or vm.status is VMStatus.pending:
                    return
                if vm.status is VMStatus.stopping and state is DomainState.running:
                    return  # still shutting down, or restarting
                self._apply_state(session, vm, state, f"libvirt: {event.detail}")

        await self._run(work)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port`` (another program, or another Twarga)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def vm_owner_name(session: Session, vm: VM) -> str:
    """The name of a VM's owner (loads the relationship if needed)."""
    owner = session.get(User, vm.owner_id)
    assert owner is not None
    return owner.name
