"""Twarga's VMs, one module a job: ``quota`` (bounds, names, per-user quotas and the
credit check), ``provisioning`` (instance folders, disks, seeds, host keys, SSH ports,
domain definitions), ``lifecycle`` (locks, statuses, actions), ``reconciliation``
(agreeing with libvirt, orphans, libvirt's events), ``views`` (the JSON), ``settings``
(the value the collaborators read) and ``service`` (:class:`VMService`, composing them).

Every name importers used from the old ``twarga_lab.services.vms`` module is here.
"""

from twarga_lab.services.vms.lifecycle import (
    _STATE_TO_STATUS,
    ACTIONS,
    STATE_TO_STATUS,
    TRANSITIONAL,
    BackgroundTasks,
    Lifecycle,
    StatusBook,
    status_for,
)
from twarga_lab.services.vms.provisioning import (
    GUEST_IP,
    HOST_KEY_PUB,
    TINY_SEED,
    Provisioner,
    port_is_free,
)
from twarga_lab.services.vms.quota import (
    VM_NAME_RE,
    CreateRequest,
    VMBounds,
    _check_range,
    check_range,
    requested_image,
    validate_name,
)
from twarga_lab.services.vms.reconciliation import Reconciler
from twarga_lab.services.vms.service import VMService
from twarga_lab.services.vms.settings import VMServiceConfig
from twarga_lab.services.vms.views import uptime_seconds, vm_owner_name, vm_to_json

__all__ = [
    "ACTIONS",
    "GUEST_IP",
    "HOST_KEY_PUB",
    "STATE_TO_STATUS",
    "TINY_SEED",
    "TRANSITIONAL",
    "VM_NAME_RE",
    "_STATE_TO_STATUS",
    "BackgroundTasks",
    "CreateRequest",
    "Lifecycle",
    "Provisioner",
    "Reconciler",
    "StatusBook",
    "VMBounds",
    "VMService",
    "VMServiceConfig",
    "_check_range",
    "check_range",
    "port_is_free",
    "requested_image",
    "status_for",
    "uptime_seconds",
    "validate_name",
    "vm_owner_name",
    "vm_to_json",
]
