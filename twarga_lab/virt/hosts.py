"""Several hypervisor hosts behind one backend, through libvirt's remote protocol.

Each host is a named libvirt URI with its own connection manager (a
:class:`~twarga_lab.virt.libvirt_backend.LibvirtBackend`: keepalive, reconnection,
lifecycle events). :class:`HostPool` is itself a :class:`HypervisorBackend`: a call about a
domain goes to the host the domain was placed on (``assign``), so services that drive one
hypervisor drive many unchanged. Choosing the host is the services' business
(``services.vms.placement``); the pool only knows where each domain lives and which hosts
answer.

A host that does not answer is *down*: listing its domains gives
``DomainState.unreachable`` for each domain placed there (never "missing": nothing may be
cleaned up because a host is away), and listeners hear when it goes and comes back.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from twarga_lab.errors import BackendUnavailable, NotFound, TwargaError, ValidationFailed
from twarga_lab.virt.backend import (
    ConsoleChannel,
    DomainState,
    HypervisorBackend,
    LifecycleListener,
    ReconnectListener,
)
from twarga_lab.virt.domain import DomainSpec
from twarga_lab.virt.host_images import HostImageCache
from twarga_lab.virt.snapshot import SnapshotInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_HOST = "local"
HOST_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")


class HostState(enum.StrEnum):
    """Whether a host takes new VMs."""

    up = "up"
    down = "down"  # its libvirtd does not answer
    draining = "draining"  # answers, keeps its VMs, takes no new ones


@dataclass(frozen=True)
class HostSpec:
    """One entry of ``TwargaLabApp.hosts``."""

    name: str
    uri: str


def parse_host_entries(entries: list[str], default_uri: str) -> list[HostSpec]:
    """``["name=uri", ...]`` as host specs; an empty list is the one host ``local`` at
    ``default_uri``. A bare URI is named after its host part (``qemu+ssh://h2/system`` is
    ``h2``). Duplicate or malformed names are refused."""
    if not entries:
        return [HostSpec(DEFAULT_HOST, default_uri)]
    specs: list[HostSpec] = []
    for entry in entries:
        name, sep, uri = entry.partition("=")
        if not sep or "://" in name:
            uri = entry
            name = (urlsplit(entry).hostname or DEFAULT_HOST).split(".")[0].lower()
        name, uri = name.strip(), uri.strip()
        if not HOST_NAME.fullmatch(name):
            raise ValidationFailed(
                f"host name {name!r} must be lower-case letters, digits and '-'",
                "hosts",
                "bad_host",
            )
        if not uri:
            raise ValidationFailed(f"host {name} has no libvirt URI", "hosts", "bad_host")
        if any(s.name == name for s in specs):
            raise ValidationFailed(f"host {name} is listed twice", "hosts", "bad_host")
        specs.append(HostSpec(name, uri))
    return specs


@dataclass(frozen=True)
class HostCapacity:
    """What a host has, as its libvirtd reports it (``virConnectGetInfo``)."""

    vcpus: int
    memory_mb: int
    arch: str
    hostname: str


@dataclass(frozen=True)
class NodeStats:
    """A host's CPU and memory use, as its libvirtd reads them (``virNodeGetCPUStats``,
    ``virNodeGetMemoryStats``); None where the driver does not say."""

    cpu_percent: float | None
    memory_total_mb: int | None
    memory_available_mb: int | None  # free + buffers + page cache


def _node_stats(conn: Any) -> tuple[dict[str, int] | None, dict[str, int] | None]:
    import libvirt

    cpu: dict[str, int] | None = None
    memory: dict[str, int] | None = None
    with contextlib.suppress(libvirt.libvirtError):
        cpu = conn.getCPUStats(-1)
    with contextlib.suppress(libvirt.libvirtError):
        memory = conn.getMemoryStats(-1)
    return cpu, memory


HostListener = Callable[[str, HostState], None]


class Host:
    """One hypervisor host: its name, URI, connection manager and drain flag."""

    def __init__(self, spec: HostSpec, backend: HypervisorBackend) -> None:
        self.spec = spec
        self.backend = backend
        self.draining = False
        self._capacity: HostCapacity | None = None
        # Its copies of the images, when it has storage of its own (else: shared files).
        self.images: HostImageCache | None = None
        # ``kvm`` or ``qemu`` for its guests (``TwargaLabApp.host_domain_types``); None:
        # the app's ``domain_type``, resolved on this machine.
        self.domain_type: str | None = None
        self.stats: NodeStats | None = None
        self._cpu_before: tuple[int, int] | None = None  # (busy, total) ns at the last read

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def uri(self) -> str:
        return self.spec.uri

    def reachable(self) -> bool:
        """Whether its libvirtd answers now (a cheap check of the open connection)."""
        connected = getattr(self.backend, "connected", None)
        if connected is None:
            return True
        return bool(connected())

    @property
    def state(self) -> HostState:
        if not self.reachable():
            return HostState.down
        return HostState.draining if self.draining else HostState.up

    @property
    def known_capacity(self) -> HostCapacity | None:
        """The capacity read last, without asking libvirt (for scrapes on the loop)."""
        return self._capacity

    def read_stats(self) -> NodeStats | None:
        """Read the host's CPU and memory use now (one round trip); None while it is
        down. CPU use is over the time since the previous read."""
        if not self.reachable():
            self.stats, self._cpu_before = None, None
            return None
        try:
            cpu, memory = self.backend.call(_node_stats, "read the host's statistics")
        except TwargaError:
            return self.stats
        percent = None
        if cpu:
            busy = sum(v for k, v in cpu.items() if k not in ("idle", "iowait"))
            total = busy + cpu.get("idle", 0) + cpu.get("iowait", 0)
            if self._cpu_before is not None and total > self._cpu_before[1]:
                percent = round(
                    100.0 * (busy - self._cpu_before[0]) / (total - self._cpu_before[1]), 1
                )
            self._cpu_before = (busy, total)
        total_mb = available_mb = None
        if memory:
            total_mb = memory.get("total", 0) // 1024 or None
            available_mb = (
                memory.get("free", 0) + memory.get("buffers", 0) + memory.get("cached", 0)
            ) // 1024
        self.stats = NodeStats(percent, total_mb, available_mb)
        return self.stats

    def capacity(self) -> HostCapacity | None:
        """The host's vCPUs and RAM, read once per connection (they do not change while
        it runs); None while it is down and was never reached."""
        if self._capacity is None:
            with contextlib.suppress(TwargaError):
                info, hostname, (_cpu, memory) = self.backend.call(
                    lambda conn: (conn.getInfo(), conn.getHostname(), _node_stats(conn)),
                    "read the host's size",
                )
                arch, memory_mb, cpus, *_ = info
                # The node's memory total where the driver has it: getInfo's figure comes
                # from NUMA node files, which some virtual machines under-report.
                if memory and memory.get("total"):
                    memory_mb = memory["total"] // 1024
                self._capacity = HostCapacity(int(cpus), int(memory_mb), str(arch), str(hostname))
        return self._capacity


class HostPool(HypervisorBackend):
    """Many hosts as one backend: each domain's calls go to the host it lives on."""

    def __init__(self, hosts: list[Host]) -> None:
        if not hosts:
            raise ValueError("a host pool needs at least one host")
        self.hosts: dict[str, Host] = {h.name: h for h in hosts}
        self.default = hosts[0]
        self.uri = self.default.uri
        self._placed: dict[str, str] = {}  # domain name -> host name
        # Domains nobody placed (orphans a crash left) -> the host whose listing had them.
        self._seen: dict[str, str] = {}
        self._lock = threading.Lock()
        self._host_listeners: list[HostListener] = []
        self._was_up: dict[str, bool] = {}
        for host in hosts:
            add_lost = getattr(host.backend, "add_lost_listener", None)
            if add_lost is not None:
                add_lost(lambda name=host.name: self._host_changed(name, HostState.down))
            host.backend.add_reconnect_listener(
                lambda name=host.name: self._host_changed(name, HostState.up)
            )

    # -- where domains live -----------------------------------------------------------

    def host(self, name: str) -> Host:
        """The host called ``name``; ``NotFound`` (``no_host``) if there is none."""
        try:
            return self.hosts[name]
        except KeyError:
            raise NotFound(f"there is no host {name}", "no_host") from None

    def assign(self, domain: str, host: str | None) -> None:
        """Record that ``domain`` lives (or will be defined) on ``host`` (None: the
        default host)."""
        with self._lock:
            self._placed[domain] = self.host(host).name if host else self.default.name

    def assign_all(self, placed: dict[str, str | None]) -> None:
        """Record many placements at once (the database's, at start-up)."""
        for domain, host in placed.items():
            self.assign(domain, host if host in self.hosts else None)

    def host_of(self, domain: str) -> Host:
        """The host ``domain`` was placed on; for one never placed, the host that listed
        it last (``states``), else the default host."""
        with self._lock:
            name = self._placed.get(domain) or self._seen.get(domain)
        return self.hosts.get(name or "", self.default)

    def domains_on(self, host: str) -> list[str]:
        """The domains placed on ``host``."""
        with self._lock:
            return [d for d, h in self._placed.items() if h == host]

    def forget(self, domain: str) -> None:
        """``domain`` is gone for good (undefined)."""
        with self._lock:
            self._placed.pop(domain, None)
            self._seen.pop(domain, None)

    # -- hosts going and coming back --------------------------------------------------

    def add_host_listener(self, listener: HostListener) -> None:
        """Call ``listener(host, state)`` (from a backend thread) when a host is lost
        (``down``) or answers again (``up``)."""
        self._host_listeners.append(listener)

    def _host_changed(self, name: str, state: HostState) -> None:
        if state is HostState.up:
            self.hosts[name]._capacity = None  # re-read: the daemon may be another one now
        for listener in list(self._host_listeners):
            try:
                listener(name, state)
            except Exception:
                log.exception("host listener failed for %s %s", name, state)

    # -- HypervisorBackend, routed ----------------------------------------------------

    def define(self, spec: DomainSpec) -> None:
        self.host_of(spec.name).backend.define(spec)

    def start(self, name: str) -> None:
        self.host_of(name).backend.start(name)

    def shutdown(self, name: str) -> None:
        self.host_of(name).backend.shutdown(name)

    def destroy(self, name: str) -> None:
        self.host_of(name).backend.destroy(name)

    def reboot(self, name: str) -> None:
        self.host_of(name).backend.reboot(name)

    def undefine(self, name: str) -> None:
        self.host_of(name).backend.undefine(name)

    def state(self, name: str) -> DomainState:
        return self.host_of(name).backend.state(name)

    def states(self, prefix: str = "") -> dict[str, DomainState]:
        """Every host's domains; a domain placed on a host that does not answer is
        ``unreachable``."""
        result: dict[str, DomainState] = {}
        for host in self.hosts.values():
            try:
                found = host.backend.states(prefix)
            except BackendUnavailable:
                for domain in self.domains_on(host.name):
                    if domain.startswith(prefix):
                        result[domain] = DomainState.unreachable
                continue
            for domain, state in found.items():
                with self._lock:
                    if domain not in self._placed:
                        self._seen[domain] = host.name
                # A domain is where it was placed; a same-named stray elsewhere is not it.
                placed = self.host_of(domain)
                if placed.name == host.name or domain not in result:
                    result[domain] = state
        return result

    def states_by_host(self, prefix: str = "") -> dict[str, dict[str, DomainState] | None]:
        """Each host's own listing (None for a host that does not answer)."""
        out: dict[str, dict[str, DomainState] | None] = {}
        for host in self.hosts.values():
            try:
                out[host.name] = host.backend.states(prefix)
            except BackendUnavailable:
                out[host.name] = None
        return out

    def add_lifecycle_listener(self, listener: LifecycleListener) -> None:
        for host in self.hosts.values():
            host.backend.add_lifecycle_listener(listener)

    def add_reconnect_listener(self, listener: ReconnectListener) -> None:
        for host in self.hosts.values():
            host.backend.add_reconnect_listener(listener)

    def domain_xml(self, name: str) -> str:
        return self.host_of(name).backend.domain_xml(name)

    def open_console(
        self,
        name: str,
        on_output: Callable[[bytes], None],
        on_closed: Callable[[str], None],
    ) -> ConsoleChannel:
        return self.host_of(name).backend.open_console(name, on_output, on_closed)

    def snapshot_create(self, name: str, snapshot_name: str, description: str) -> SnapshotInfo:
        return self.host_of(name).backend.snapshot_create(name, snapshot_name, description)

    def snapshots(self, name: str) -> list[SnapshotInfo]:
        return self.host_of(name).backend.snapshots(name)

    def snapshot_revert(self, name: str, snapshot_name: str) -> None:
        self.host_of(name).backend.snapshot_revert(name, snapshot_name)

    def snapshot_delete(self, name: str, snapshot_name: str) -> None:
        self.host_of(name).backend.snapshot_delete(name, snapshot_name)

    def call(self, fn: Callable[[Any], T], action: str) -> T:
        """``fn`` on the default host's connection (bulk readers use ``call_on``)."""
        return self.default.backend.call(fn, action)

    def read_stats(self) -> dict[str, NodeStats | None]:
        """Every host's CPU and memory use now (the metrics collector's tick)."""
        return {name: host.read_stats() for name, host in self.hosts.items()}

    def call_on(self, host: str, fn: Callable[[Any], T], action: str) -> T:
        """``fn`` on one host's connection."""
        return self.host(host).backend.call(fn, action)

    def close(self) -> None:
        for host in self.hosts.values():
            host.backend.close()
