"""Cloning a stopped VM: a new VM of the same owner, image and size whose disk is a copy of
the source's (what the owner wrote is in it), with its own domain, SSH port, host key and
seed.

The new VM is a create as far as quotas and credits go (the same checks and refusals as
``POST /vms``). Its row is added pending; in the background the source's disk is copied
(``qemu-img convert -B``: a new overlay on the image's base holding everything the source
changed; the source's snapshots are not copied), the seeds are made new (a cloud-init
image gets a new instance-id and the clone's name as hostname, so cloud-init runs its
per-instance modules again: hostname, new SSH host keys, the owner's key; a kernel image
gets its own tiny seed and host key), the domain is defined, and the clone is stopped:
ready to start. A failure moves it to error with a message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from twarga_lab.db.models import VM, VMStatus
from twarga_lab.errors import BackendError, Conflict, QuotaExceeded, TwargaError
from twarga_lab.services import Identity
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.users import lock_user
from twarga_lab.services.vms import quota, views
from twarga_lab.services.vms.quota import CreateRequest
from twarga_lab.virt.domain import DomainSpec
from twarga_lab.virt.images import partial_path

if TYPE_CHECKING:
    from twarga_lab.db import Database
    from twarga_lab.services.users import UserService
    from twarga_lab.services.vms.lifecycle import BackgroundTasks, StatusBook
    from twarga_lab.services.vms.provisioning import Provisioner
    from twarga_lab.virt.backend import HypervisorBackend

log = logging.getLogger(__name__)
run = asyncio.to_thread

ACTION = "cloned"  # the SOC event's action (event_schemas/vm/v1.yaml)
#: Seconds a disk copy may take (a full 100 GB disk on a slow host takes minutes).
COPY_TIMEOUT = 3600.0


def copy_disk(source: Path, base: Path, dest: Path, timeout: float = COPY_TIMEOUT) -> None:
    """``dest``: a qcow2 overlay on ``base`` with the contents of ``source`` (an overlay of
    the same base), of the same virtual size; internal snapshots are not copied.

    Written under a temporary name and renamed, like every disk Twarga makes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(dest)
    partial.unlink(missing_ok=True)
    command = [
        "qemu-img", "convert", "-q", "-O", "qcow2", "-B", str(base), "-F", "qcow2",
        str(source), str(partial),
    ]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout)
        partial.chmod(0o600)
        os.replace(partial, dest)
    except FileNotFoundError as e:
        raise BackendError("qemu-img is missing: install Debian's qemu-utils") from e
    except subprocess.CalledProcessError as e:
        raise BackendError(f"qemu-img convert failed: {e.stderr.strip()}") from e
    except subprocess.TimeoutExpired as e:
        raise BackendError(f"copying the disk took longer than {timeout:.0f} s") from e
    finally:
        partial.unlink(missing_ok=True)


class Cloner:
    """Adds clone rows (with the create's quota checks) and makes their files."""

    def __init__(
        self,
        db: Database,
        users: UserService,
        provisioner: Provisioner,
        backend: HypervisorBackend,
        book: StatusBook,
        tasks: BackgroundTasks,
    ) -> None:
        self.db = db
        self.users = users
        self.provisioner = provisioner
        self.backend = backend
        self.book = book
        self.tasks = tasks

    async def clone(self, identity: Identity, source_id: int, name: str) -> int:
        """Add the clone of ``source_id`` called ``name`` (pending) and copy it in the
        background; returns its id. 404 ``no_vm`` for a VM the caller may not see, 409
        ``vm_not_stopped`` unless the source is stopped, and the create's refusals."""
        async with self.book.lock(source_id):  # the source cannot start meanwhile
            vm_id = await run(self.insert, identity, source_id, name)
        self.tasks.spawn(self.make(vm_id, source_id), f"clone VM {source_id} into VM {vm_id}")
        return vm_id

    def insert(self, identity: Identity, source_id: int, name: str) -> int:
        """The clone's row, after the create's checks (under the owner's lock)."""
        with self.db.session() as session:
            source = views.owned_vm(session, identity, source_id)
            if source.status is not VMStatus.stopped:
                raise Conflict(
                    f"VM {source.name} is {source.status.value}: stop it before cloning it",
                    "vm_not_stopped",
                )
            owner_id, owner = source.owner_id, source.owner.name
            request = CreateRequest(
                name=name,
                image=source.image,
                ram=source.ram_mb,
                cpu=source.cpu,
                disk=source.disk_gb,
            )
            image = self.provisioner.images.get(source.image)
            source_name, password = source.name, source.root_password
        with self.db.session() as session:
            lock_user(session, owner_id)  # quota checks of this user run one at a time
            try:
                quota.check_create_quota(session, self.users, owner_id, request)
            except QuotaExceeded as refusal:
                refused = refusal
            else:
                vm = self.provisioner.new_vm(session, owner_id, request, image)
                # The disk is the source's, and so is the password hash in it (cloud-init
                # sets a password when it makes the account, which the source did).
                vm.root_password = password
                record_event(
                    session, EventType.vm, Severity.info,
                    f"VM {vm.name} cloned from VM {source_name} by {identity.name}",
                    user_name=owner, vm_id=vm.id, action=ACTION, actor=identity.name,
                    source_vm_id=source_id, source_name=source_name, image=vm.image,
                    ram=vm.ram_mb, cpu=vm.cpu, disk=vm.disk_gb,
                )  # fmt: skip
                return vm.id
        with self.db.session() as session:
            record_event(
                session, EventType.vm, Severity.warning,
                f"clone {name} of VM {source_name} refused for {identity.name}: "
                f"{refused.message}",
                user_name=owner, vm_id=source_id, action=ACTION, actor=identity.name,
                reason=refused.reason, source_vm_id=source_id,
            )  # fmt: skip
        raise refused

    async def make(self, vm_id: int, source_id: int) -> None:
        """Copy the source's disk, make the clone's seeds and domain: pending -> stopped
        (or error with a message)."""
        async with self.book.lock(source_id), self.book.lock(vm_id):
            if await run(self.book.status, vm_id) is not VMStatus.pending:
                return  # destroyed while queued
            try:
                spec = await run(self.make_files, vm_id, source_id)
                await run(self.backend.define, spec)
            except Exception as e:
                message = e.message if isinstance(e, TwargaError) else f"{type(e).__name__}: {e}"
                log.warning("cloning VM %s into VM %s failed: %s", source_id, vm_id, message)
                await run(self.provisioner.remove_files, await run(self.book.domain_name, vm_id))
                await run(
                    self.book.set_status, vm_id, VMStatus.error, f"clone failed: {message}",
                    "provision",
                )  # fmt: skip
                return
            await run(self.book.set_status, vm_id, VMStatus.stopped, None, "provision")

    def make_files(self, vm_id: int, source_id: int) -> DomainSpec:
        """The clone's disk (a copy of the source's) and its own seeds; its domain."""
        with self.db.session() as session:
            source, vm = session.get(VM, source_id), session.get(VM, vm_id)
            assert vm is not None and vm.domain_name is not None
            if source is None or source.status is not VMStatus.stopped:
                state = "gone" if source is None else source.status.value
                raise Conflict(f"the source VM is {state}, no longer stopped", "vm_not_stopped")
            assert source.domain_name is not None
            base = self.provisioner.images.get(vm.image).base_disk
            source_disk = self.provisioner.instance_dir(source.domain_name) / "disk.qcow2"
            domain = vm.domain_name
        self.provisioner.remove_files(domain)  # whatever an interrupted copy left
        copy_disk(source_disk, base, self.provisioner.instance_dir(domain) / "disk.qcow2")
        # The disk exists: only the seeds (new instance-id, hostname, host key) are made.
        return self.provisioner.prepare_disks(vm_id)
