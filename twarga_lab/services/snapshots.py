"""VM snapshots: libvirt internal snapshots of a VM's disk (and memory when it runs).

Only a VM's owner (or an admin) sees or changes its snapshots; someone else's VM is a 404
as everywhere. Each change is a SOC event of type ``vm``. Blocking calls run in worker
threads and under the VM's lifecycle lock, so a snapshot never races a start or a destroy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from traitlets import Int
from traitlets.config import LoggingConfigurable

from twarga_lab.db import Database
from twarga_lab.db.models import VM, VMStatus
from twarga_lab.errors import Conflict, NotFound, QuotaExceeded, ValidationFailed
from twarga_lab.services import Identity
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.vms import TRANSITIONAL, VMService, status_for, validate_name
from twarga_lab.services.vms.quota import check_snapshot_quota
from twarga_lab.virt.backend import HypervisorBackend
from twarga_lab.virt.snapshot import SnapshotInfo

T = TypeVar("T")
SNAPSHOT_ACTIONS = ("revert",)


def snapshot_to_json(snapshot: SnapshotInfo) -> dict[str, Any]:
    """A snapshot as the API shows it."""
    return {
        "name": snapshot.name,
        "created_at": snapshot.created_at.isoformat(),
        "state": snapshot.state,
    }


def validate_snapshot_name(name: str) -> str:
    """A snapshot name follows the VM-name rules (422 invalid_name otherwise)."""
    return validate_name(name)


class SnapshotService(LoggingConfigurable):
    """List, create, revert and delete the snapshots of one's VMs."""

    max_per_vm = Int(
        5, help="Most snapshots one VM may have (taking one more is 409 quota_exceeded)."
    ).tag(config=True)

    def __init__(
        self, db: Database, backend: HypervisorBackend, vms: VMService, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.db = db
        self.backend = backend
        self.vms = vms

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def _vm(self, identity: Identity, vm_id: int, *, changing: bool) -> dict[str, Any]:
        """The VM (404 if not the caller's); 409 if it is busy and the call changes it."""
        vm = await self.vms.get(identity, vm_id)
        status = VMStatus(vm["status"])
        if status is VMStatus.pending:
            raise Conflict(f"VM {vm['name']} is still being created", "vm_pending")
        if changing and status in TRANSITIONAL:
            raise Conflict(f"VM {vm['name']} is {status.value}; try again shortly", "vm_busy")
        if not vm["domain"]:
            raise Conflict(f"VM {vm['name']} has no libvirt domain", "vm_busy")
        return vm

    def _record(
        self,
        vm: dict[str, Any],
        identity: Identity,
        action: str,
        text: str,
        snapshot: str,
        severity: Severity = Severity.info,
        **details: Any,
    ) -> None:
        with self.db.session() as session:
            record_event(
                session, EventType.vm, severity, text,
                user_name=vm["owner"], vm_id=vm["id"], action=action, actor=identity.name,
                snapshot=snapshot, **details,
            )  # fmt: skip

    def _check_storage(self, vm: dict[str, Any], identity: Identity, name: str) -> None:
        """409 ``quota_exceeded`` (a warning event) if one more snapshot of ``vm`` would
        take its owner's disk usage (snapshots included) over ``max_disk_gb``."""
        try:
            with self.db.session() as session:
                row = session.get(VM, vm["id"])
                assert row is not None
                check_snapshot_quota(session, self.vms.users, row)
        except QuotaExceeded as refused:
            self._record(
                vm, identity, "snapshot_create",
                f"snapshot {name} of VM {vm['name']} refused for {identity.name}: "
                f"disk quota", name, Severity.warning, reason="quota_exceeded",
            )  # fmt: skip
            raise refused

    async def list(self, identity: Identity, vm_id: int) -> list[dict[str, Any]]:
        """The VM's snapshots, oldest first."""
        vm = await self._vm(identity, vm_id, changing=False)
        found = await self._run(self.backend.snapshots, vm["domain"])
        return [snapshot_to_json(s) for s in found]

    async def create(self, identity: Identity, vm_id: int, name: str) -> dict[str, Any]:
        """Take snapshot ``name`` of the VM (409 on a duplicate or over the quota)."""
        validate_snapshot_name(name)
        await self._vm(identity, vm_id, changing=True)
        async with self.vms.lock(vm_id):
            vm = await self._vm(identity, vm_id, changing=True)
            domain = vm["domain"]
            existing = await self._run(self.backend.snapshots, domain)
            if any(s.name == name for s in existing):
                raise Conflict(f"VM {vm['name']} already has a snapshot {name}", "duplicate_name")
            if len(existing) >= self.max_per_vm:
                await self._run(
                    self._record, vm, identity, "snapshot_create",
                    f"snapshot {name} of VM {vm['name']} refused for {identity.name}: "
                    f"quota of {self.max_per_vm} snapshots", name, Severity.warning,
                )  # fmt: skip
                raise QuotaExceeded(
                    f"VM {vm['name']} has {len(existing)} snapshots, the most it may have "
                    f"is {self.max_per_vm}; delete one first",
                    "quota_exceeded",
                )
            # A snapshot costs storage: refused at zero credits, as starting a VM is.
            await self._run(self.vms.require_credits, identity, vm_id, "snapshot_create")
            await self._run(self._check_storage, vm, identity, name)
            description = f"Twarga snapshot of VM {vm['name']} by {identity.name}"
            snapshot = await self._run(self.backend.snapshot_create, domain, name, description)
            await self._run(
                self._record, vm, identity, "snapshot_create",
                f"snapshot {name} of VM {vm['name']} taken by {identity.name} "
                f"({snapshot.state})", name,
            )  # fmt: skip
        return snapshot_to_json(snapshot)

    async def _find(self, domain: str, vm_name: str, name: str) -> SnapshotInfo:
        for snapshot in await self._run(self.backend.snapshots, domain):
            if snapshot.name == name:
                return snapshot
        raise NotFound(f"VM {vm_name} has no snapshot {name}", "no_snapshot")

    async def action(
        self, identity: Identity, vm_id: int, name: str, action: str
    ) -> dict[str, Any]:
        """Run a snapshot action (``revert``); returns the VM as it is afterwards."""
        if action not in SNAPSHOT_ACTIONS:
            raise ValidationFailed(
                f"action must be one of {', '.join(SNAPSHOT_ACTIONS)}",
                field="action",
                reason="unknown_action",
            )
        await self._vm(identity, vm_id, changing=True)
        async with self.vms.lock(vm_id):
            vm = await self._vm(identity, vm_id, changing=True)
            domain = vm["domain"]
            snapshot = await self._find(domain, vm["name"], name)
            if snapshot.state == "running" and vm["status"] != VMStatus.running.value:
                # Reverting to a running snapshot starts the VM: it needs credits.
                await self._run(self.vms.require_credits, identity, vm_id, "snapshot_revert")
            # A transitional status first: libvirt's lifecycle events of the revert are then
            # the expected outcome, not a change "outside Twarga".
            moving = VMStatus.starting if snapshot.state == "running" else VMStatus.stopping
            await self._run(
                self.vms.set_status, vm_id, moving, None, "snapshot_revert", identity.name
            )
            try:
                await self._run(self.backend.snapshot_revert, domain, name)
                await self._run(
                    self._record, vm, identity, "snapshot_revert",
                    f"VM {vm['name']} reverted to snapshot {name} by {identity.name}", name,
                )  # fmt: skip
            finally:
                state = await self._run(self.backend.state, domain)
                status = status_for(state)
                await self._run(
                    self.vms.set_status, vm_id, status, None, "snapshot_revert", identity.name
                )
        return await self.vms.get(identity, vm_id)

    async def delete(self, identity: Identity, vm_id: int, name: str) -> None:
        """Delete snapshot ``name`` (404 if the VM has none of that name)."""
        await self._vm(identity, vm_id, changing=True)
        async with self.vms.lock(vm_id):
            vm = await self._vm(identity, vm_id, changing=True)
            await self._find(vm["domain"], vm["name"], name)
            await self._run(self.backend.snapshot_delete, vm["domain"], name)
            await self._run(
                self._record, vm, identity, "snapshot_delete",
                f"snapshot {name} of VM {vm['name']} deleted by {identity.name}", name,
            )  # fmt: skip


__all__ = ["SnapshotService", "snapshot_to_json", "validate_snapshot_name"]
