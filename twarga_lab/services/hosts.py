"""Hypervisor hosts as admins see them, and where a new VM goes.

Placement: the host that is up (not down, not draining) with the most free RAM, where
free RAM is the host's RAM (times ``HostService.ram_overcommit``) less the RAM of the
live VMs placed on it. What Twarga has promised is what counts, not what QEMU touches
now: two daemons on one machine see the same free memory, and a guest that boots small
grows later. A lab goes on one host (its private network is a switch beside its QEMU
processes), so it needs one host with room for all its machines.

Blocking (database, a libvirt call per host the first time): run it in worker threads.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from traitlets import Float
from traitlets.config import LoggingConfigurable

from twarga_lab.db import Database
from twarga_lab.db.models import VM, HypervisorHost, VMStatus
from twarga_lab.errors import Conflict, TwargaError
from twarga_lab.services import Identity
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.users import LIVE_STATUSES
from twarga_lab.virt.hosts import DEFAULT_HOST, Host, HostPool, HostState

log = logging.getLogger(__name__)
GB = 1024**3


@dataclass(frozen=True)
class HostUsage:
    """What the live VMs placed on a host have been given."""

    vms: int = 0
    vcpus: int = 0
    ram_mb: int = 0
    disk_gb: int = 0


def host_usage(session: Session) -> dict[str, HostUsage]:
    """Live VMs, vCPUs and RAM per host (VMs from before hosts are on ``local``)."""
    rows = session.execute(
        select(
            VM.host, func.count(VM.id), func.sum(VM.cpu), func.sum(VM.ram_mb), func.sum(VM.disk_gb)
        )
        .where(VM.status.in_(LIVE_STATUSES))
        .group_by(VM.host)
    ).all()
    usage: dict[str, HostUsage] = {}
    for host, count, vcpus, ram, disk in rows:
        name = host or DEFAULT_HOST
        before = usage.get(name, HostUsage())
        usage[name] = HostUsage(
            before.vms + int(count),
            before.vcpus + int(vcpus or 0),
            before.ram_mb + int(ram or 0),
            before.disk_gb + int(disk or 0),
        )
    return usage


class HostService(LoggingConfigurable):
    """Lists hosts, drains them, and places new VMs."""

    ram_overcommit = Float(
        0.0,
        help="""RAM a host may promise to VMs, as a multiple of its RAM: a VM goes only on
        a host where it fits. 0 (the default): no limit, the host with the most free RAM
        is chosen anyway (a single machine behaves as before hosts existed).""",
    ).tag(config=True)

    def __init__(
        self, db: Database, pool: HostPool, vms_dir: Path | None = None, **kwargs: Any
    ) -> None:
        """``vms_dir``: the VM folder hosts share (its filesystem is their disk)."""
        super().__init__(**kwargs)
        self.db = db
        self.pool = pool
        self.vms_dir = vms_dir

    def disk(self, host: Host) -> tuple[int, int] | None:
        """Size and free bytes of a host's VM storage; None when it cannot be read."""
        if host.images is not None:
            if not host.reachable():
                return None
            try:
                return host.images.disk()
            except TwargaError:
                return None
        if self.vms_dir is None or not self.vms_dir.exists():
            return None
        total, _used, free = shutil.disk_usage(self.vms_dir)
        return total, free

    # -- start-up -----------------------------------------------------------------------

    def load(self) -> None:
        """Put rows with no host on the default host, tell the pool where every live
        domain is, and read back the drain flags."""
        with self.db.session() as session:
            for vm in session.scalars(select(VM).where(VM.host.is_(None))):
                vm.host = self.pool.default.name
            placed = session.execute(
                select(VM.domain_name, VM.host).where(
                    VM.status != VMStatus.destroyed, VM.domain_name.is_not(None)
                )
            ).all()
            draining = dict(
                session.execute(select(HypervisorHost.name, HypervisorHost.draining)).tuples().all()
            )
        self.pool.assign_all({domain: host for domain, host in placed if domain})
        for host in self.pool.hosts.values():
            host.draining = bool(draining.get(host.name, False))

    # -- placement ----------------------------------------------------------------------

    def free_ram_mb(self, host: Host, usage: HostUsage) -> float | None:
        """RAM the host can still promise; None: no limit (``ram_overcommit`` 0) or its
        size is not known (never reached)."""
        capacity = host.capacity()
        if capacity is None:
            return None
        total = capacity.memory_mb * (self.ram_overcommit or 1.0)
        return total - usage.ram_mb

    def choose(self, session: Session, ram_mb: int, exclude: Sequence[str] = ()) -> str:
        """The host a new VM (or a whole lab, ``ram_mb`` its total) goes on; never one of
        ``exclude`` (anti-affinity: the hosts a spread lab's machines are on already).

        409 ``no_host`` when no host is up and taking VMs, ``no_host_capacity`` when
        ``ram_overcommit`` is set and none has room."""
        usage = host_usage(session)
        candidates = [
            h for h in self.pool.hosts.values() if h.state is HostState.up and h.name not in exclude
        ]
        if not candidates:
            states = ", ".join(f"{h.name} {h.state.value}" for h in self.pool.hosts.values())
            if exclude:
                states += f"; already used by this lab: {', '.join(exclude)}"
            raise Conflict(f"no hypervisor host takes new VMs ({states})", "no_host")
        ranked = []
        for order, host in enumerate(candidates):
            free = self.free_ram_mb(host, usage.get(host.name, HostUsage()))
            if self.ram_overcommit and (free is None or free < ram_mb):
                continue
            # Most free RAM first; unknown sizes last; then fewer VMs; then listed order.
            ranked.append(
                (free is None, -(free or 0.0), usage.get(host.name, HostUsage()).vms, order, host)
            )
        if not ranked:
            raise Conflict(f"no hypervisor host has {ram_mb} MB of RAM free", "no_host_capacity")
        return min(ranked, key=lambda r: r[:4])[-1].name

    # -- what admins see and do ---------------------------------------------------------

    def host_json(self, host: Host, usage: HostUsage) -> dict[str, Any]:
        capacity = host.capacity()
        free = self.free_ram_mb(host, usage)
        disk = self.disk(host)
        stats = host.stats if host.state is not HostState.down else None
        return {
            "name": host.name,
            "uri": host.uri,
            "state": host.state.value,
            "draining": host.draining,
            "default": host is self.pool.default,
            "hostname": capacity.hostname if capacity else None,
            "arch": capacity.arch if capacity else None,
            "vcpus": capacity.vcpus if capacity else None,
            "memory_mb": capacity.memory_mb if capacity else None,
            "vms": usage.vms,
            "vcpus_used": usage.vcpus,
            "ram_used_mb": usage.ram_mb,
            "ram_free_mb": round(free) if free is not None else None,
            "disk_total_gb": round(disk[0] / GB, 1) if disk else None,
            "disk_free_gb": round(disk[1] / GB, 1) if disk else None,
            "disk_used_gb": usage.disk_gb,  # what its VMs' disks may grow to
            # What the host's libvirtd read at the metrics collector's last tick.
            "cpu_usage_percent": stats.cpu_percent if stats else None,
            "memory_available_mb": stats.memory_available_mb if stats else None,
            "domain_type": host.domain_type,  # None: the app's (a pool made without it)
            "storage": "own" if host.images is not None else "shared",
            "images": host.images.status() if host.images is not None else [],
        }

    def list(self) -> list[dict[str, Any]]:
        """Every host: its URI, state, capacity and what its VMs use."""
        with self.db.session() as session:
            usage = host_usage(session)
        return [self.host_json(h, usage.get(h.name, HostUsage())) for h in self.pool.hosts.values()]

    def get(self, name: str) -> dict[str, Any]:
        """One host (``NotFound`` ``no_host``)."""
        host = self.pool.host(name)
        with self.db.session() as session:
            usage = host_usage(session).get(host.name, HostUsage())
        return self.host_json(host, usage)

    def set_draining(self, identity: Identity, name: str, draining: bool) -> dict[str, Any]:
        """Drain a host (it keeps its VMs and takes no new ones) or take it back."""
        host = self.pool.host(name)
        with self.db.session() as session:
            row = session.get(HypervisorHost, host.name)
            if row is None:
                row = HypervisorHost(name=host.name, draining=draining)
                session.add(row)
            changed = row.draining != draining or host.draining != draining
            row.draining = draining
            host.draining = draining
            if changed:
                record_event(
                    session, EventType.system, Severity.info,
                    f"host {host.name} {'drained' if draining else 'takes new VMs again'}"
                    f" by {identity.name}",
                    action="host_drain" if draining else "host_undrain", host=host.name,
                    actor=identity.name,
                )  # fmt: skip
        return self.get(host.name)
