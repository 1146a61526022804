"""What a VM may be: per-VM size bounds, name rules, the checks of a create or update
body, and the per-user quota and credit checks made before a VM is created or started.

Every refusal is a :class:`~twarga_lab.errors.TwargaError` whose ``reason`` the API
returns unchanged (``invalid_name``, ``out_of_range``, ``quota_exceeded``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from twarga_lab.db import Database
from twarga_lab.db.models import VM
from twarga_lab.errors import Conflict, NotFound, QuotaExceeded, ValidationFailed
from twarga_lab.schemas.base import Unset

# Re-exported: the name rule and the image alias are the schema's (``schemas.vms``).
from twarga_lab.schemas.vms import (  # noqa: F401
    VM_NAME_RE,
    CreateVM,
    UpdateVM,
    requested_image,
    validate_name,
)
from twarga_lab.services import Identity
from twarga_lab.services.credits import has_credits
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.users import LIVE_STATUSES, UserService, usage
from twarga_lab.virt.images import ImageStore


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
class CreateRequest:
    name: str
    image: str
    ram: int
    cpu: int
    disk: int


def check_range(value: int, low: int, high: int, field_name: str, unit: str) -> int:
    """``value`` if ``low <= value <= high``, else ValidationFailed ``out_of_range``."""
    if not low <= value <= high:
        raise ValidationFailed(
            f"{field_name} must be between {low} and {high} {unit}, not {value}",
            field=field_name,
            reason="out_of_range",
        )
    return value


_check_range = check_range  # the name vms.py had


def validate_create(
    request: CreateVM, bounds: VMBounds, images: ImageStore, default_image: str
) -> CreateRequest:
    """Check a create request's sizes and image (its name and shape are the schema's);
    raises ValidationFailed (422). The disk may not be smaller than the image needs."""
    b = bounds
    image_name = request.image_name or default_image
    try:
        image = images.get(image_name)
    except NotFound:
        raise ValidationFailed(
            f"image {image_name!r} does not exist; GET /twarga/api/images lists them",
            field=request.image_field,
            reason="unknown_image",
        ) from None
    min_disk = max(b.min_disk_gb, image.min_disk_gb)
    ram = b.min_ram_mb if request.ram is None else request.ram
    cpu = b.min_cpu if request.cpu is None else request.cpu
    ram = check_range(ram, b.min_ram_mb, b.max_ram_mb, "ram", "MB")
    cpu = check_range(cpu, b.min_cpu, b.max_cpu, "cpu", "vCPUs")
    disk = check_range(
        min_disk if request.disk is None else request.disk,
        min_disk,
        b.max_disk_gb,
        "disk",
        "GB",
    )
    return CreateRequest(name=request.name, image=image.name, ram=ram, cpu=cpu, disk=disk)


def validate_update(request: UpdateVM, bounds: VMBounds) -> None:
    """Check an update's RAM and CPUs against the bounds (its name is the schema's)."""
    b = bounds
    if not isinstance(request.ram, Unset):
        check_range(request.ram, b.min_ram_mb, b.max_ram_mb, "ram", "MB")
    if not isinstance(request.cpu, Unset):
        check_range(request.cpu, b.min_cpu, b.max_cpu, "cpu", "vCPUs")


def check_name_free(session: Session, owner_id: int, name: str) -> None:
    """409 ``name_taken`` if the owner already has a live VM called ``name``."""
    taken = session.scalar(
        select(VM.id).where(
            VM.owner_id == owner_id,
            VM.name == name,
            VM.status.in_(LIVE_STATUSES),
        )
    )
    if taken is not None:
        raise Conflict(f"you already have a VM named {name!r}", "name_taken")


def check_create_quota(
    session: Session, users: UserService, user_id: int, request: CreateRequest
) -> None:
    """Whether ``user_id`` may have one more VM of this size (call under the user's lock,
    so concurrent creates of one user are checked one at a time)."""
    check_name_free(session, user_id, request.name)
    if not has_credits(session, user_id):
        raise QuotaExceeded("you have no credits left; ask an admin for more", "no_credits")
    quota = users.effective_quota(session, user_id)
    used = users.usage(session, user_id)  # snapshots' GB included
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
    if quota.max_disk_gb is not None and used.total_disk_gb + request.disk > quota.max_disk_gb:
        raise QuotaExceeded(
            f"{request.disk} GB more disk would exceed your quota of {quota.max_disk_gb} GB",
            "quota_exceeded",
        )


def check_snapshot_quota(session: Session, users: UserService, vm: VM) -> None:
    """Whether ``vm``'s owner may hold one more snapshot of it: a snapshot counts as the
    VM's disk size (the most it can hold) against ``max_disk_gb``."""
    quota = users.effective_quota(session, vm.owner_id)
    if quota.max_disk_gb is None:
        return
    used = users.usage(session, vm.owner_id)
    if used.total_disk_gb + vm.disk_gb > quota.max_disk_gb:
        raise QuotaExceeded(
            f"a snapshot of VM {vm.name} counts as {vm.disk_gb} GB more disk and would "
            f"exceed your quota of {quota.max_disk_gb} GB ({used.disk_gb} GB of disks and "
            f"{used.snapshot_disk_gb} GB of snapshots in use)",
            "quota_exceeded",
        )


def check_ram_change(session: Session, users: UserService, vm: VM, ram_mb: int) -> None:
    """Whether ``vm`` may have ``ram_mb`` instead of its RAM within its owner's quota."""
    quota = users.effective_quota(session, vm.owner_id)
    used = usage(session, vm.owner_id)
    if used.ram_mb - vm.ram_mb + ram_mb > quota.max_ram_mb:
        raise QuotaExceeded(
            f"{ram_mb} MB would exceed the RAM quota of {quota.max_ram_mb} MB",
            "quota_exceeded",
        )


def require_credits(db: Database, identity: Identity, vm_id: int, action: str) -> None:
    """Refuse to (re)start a VM whose owner has no credits left (409 no_credits); the
    refusal is a warning event."""
    with db.session() as session:
        vm = session.get(VM, vm_id)
        assert vm is not None
        if has_credits(session, vm.owner_id):
            return
        name, owner = vm.name, vm.owner.name
    with db.session() as session:
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
