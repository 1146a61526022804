"""The settings the VM service's collaborators read (:class:`VMServiceConfig`): the
service's traits and the app-wide values it was made with, as one frozen value."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twarga_lab.services.vms.quota import VMBounds


@dataclass(frozen=True)
class VMServiceConfig:
    """The settings the VM service's collaborators read: its traits and the app-wide
    values it was made with (an internal value object; the defaults are the traits')."""

    vms_dir: Path
    domain_type: str
    domain_prefix: str
    default_image: str
    stop_timeout: float
    ssh_port_min: int
    ssh_port_max: int
    bounds: VMBounds
    # False on libvirt's test driver: no QEMU runs, so no lab switch is started for it.
    runs_guests: bool = True

    @property
    def instances_dir(self) -> Path:
        return self.vms_dir / "instances"
