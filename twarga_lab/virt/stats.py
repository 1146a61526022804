"""Domain statistics from libvirt in bulk: one ``getAllDomainStats`` call per read, however
many domains there are.

- the *fast* read (every tick): state and CPU time of every domain;
- the *slow* read (every 30-60 s): balloon, block and interface counters, with
  ``VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT`` so a domain busy with a job (a migration, a
  block job, a stuck monitor) is skipped instead of stalling the read;
- domain *facts* (vCPU count, memory, disk and NIC names) parsed from the domain XML, cached
  and forgotten on lifecycle events, never fetched per tick.

Blocking calls: run them in a worker thread. No tornado here.
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import libvirt

from twarga_lab.errors import TwargaError
from twarga_lab.virt.backend import DomainState
from twarga_lab.virt.libvirt_backend import LIBVIRT_STATES

T = TypeVar("T")

FAST_STATS = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
SLOW_STATS = (
    libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_BLOCK
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
)
NOWAIT = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT


# ``call(fn, action)`` runs ``fn(conn)`` on a live connection (``LibvirtBackend.call``).
ConnectionCall = Callable[[Callable[[libvirt.virConnect], Any], str], Any]


class FastStats(NamedTuple):
    """What every tick reads of one domain (a tuple: hundreds are made per tick)."""

    name: str
    state: DomainState
    cpu_time_ns: int | None  # None where the driver does not report it (the test driver)


@dataclass(frozen=True)
class SlowStats:
    """Memory, disk and network counters of one domain (totals over its disks and NICs)."""

    name: str
    memory_current_kib: int | None = None  # the balloon's current size
    memory_available_kib: int | None = None  # as the guest sees it (virtio balloon stats)
    memory_unused_kib: int | None = None
    memory_rss_kib: int | None = None  # QEMU's resident memory on the host
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    disk_allocation_bytes: int = 0
    disk_capacity_bytes: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    disks: int = 0
    nics: int = 0

    @property
    def memory_used_kib(self) -> int | None:
        """Memory the guest uses: from its own balloon statistics when it reports them,
        else QEMU's resident size (capped at the balloon)."""
        if self.memory_available_kib and self.memory_unused_kib is not None:
            return max(0, self.memory_available_kib - self.memory_unused_kib)
        if self.memory_rss_kib is not None:
            cap = self.memory_current_kib or self.memory_rss_kib
            return min(self.memory_rss_kib, cap)
        return None

    @property
    def memory_total_kib(self) -> int | None:
        """The memory the guest has: what it reports, else the balloon's size."""
        return self.memory_available_kib or self.memory_current_kib


@dataclass(frozen=True)
class DomainFacts:
    """What the domain XML says and rarely changes."""

    vcpus: int
    memory_kib: int
    disks: tuple[str, ...] = ()
    nics: tuple[str, ...] = ()


def parse_fast(name: str, record: dict[str, Any]) -> FastStats:
    """A fast record (``state.*`` and ``cpu.*`` keys) of one domain."""
    state = LIBVIRT_STATES.get(record.get("state.state", -1), DomainState.unknown)
    cpu = record.get("cpu.time")
    return FastStats(name=name, state=state, cpu_time_ns=int(cpu) if cpu is not None else None)


def parse_slow(name: str, record: dict[str, Any]) -> SlowStats:
    """A slow record (``balloon.*``, ``block.*``, ``net.*`` keys) of one domain."""

    def total(prefix: str, count: int, field: str) -> int:
        return sum(int(record.get(f"{prefix}.{i}.{field}", 0) or 0) for i in range(count))

    blocks = int(record.get("block.count", 0) or 0)
    nets = int(record.get("net.count", 0) or 0)
    return SlowStats(
        name=name,
        memory_current_kib=_int(record.get("balloon.current")),
        memory_available_kib=_int(record.get("balloon.available")),
        memory_unused_kib=_int(record.get("balloon.unused")),
        memory_rss_kib=_int(record.get("balloon.rss")),
        disk_read_bytes=total("block", blocks, "rd.bytes"),
        disk_write_bytes=total("block", blocks, "wr.bytes"),
        disk_allocation_bytes=total("block", blocks, "allocation"),
        disk_capacity_bytes=total("block", blocks, "capacity"),
        net_rx_bytes=total("net", nets, "rx.bytes"),
        net_tx_bytes=total("net", nets, "tx.bytes"),
        disks=blocks,
        nics=nets,
    )


def parse_facts(xml: str) -> DomainFacts:
    """vCPUs, memory and device names from a domain's XML."""
    root = ET.fromstring(xml)
    vcpu = root.find("vcpu")
    # <vcpu current='N'>max</vcpu>: the guest runs with ``current`` when it is given.
    vcpus = int((vcpu.get("current") or vcpu.text or "1") if vcpu is not None else 1)
    memory = root.find("currentMemory")
    if memory is None:
        memory = root.find("memory")
    memory_kib = _kib(memory) if memory is not None else 0
    disks = tuple(
        target.get("dev", "") for target in root.findall("devices/disk/target") if target.get("dev")
    )
    nics = tuple(
        target.get("dev", "")
        for target in root.findall("devices/interface/target")
        if target.get("dev")
    )
    return DomainFacts(vcpus=max(1, vcpus), memory_kib=memory_kib, disks=disks, nics=nics)


class DomainStatsReader:
    """Bulk reads of the domains whose names start with ``prefix``."""

    def __init__(self, call: ConnectionCall, prefix: str) -> None:
        self._call = call
        self.prefix = prefix
        self._lock = threading.Lock()
        self._facts: dict[str, DomainFacts] = {}
        self._domains: dict[str, libvirt.virDomain] = {}

    def _bulk(self, stats: int, flags: int, action: str) -> list[tuple[libvirt.virDomain, dict]]:
        return self._call(lambda conn: conn.getAllDomainStats(stats, flags), action)

    def fast(self) -> dict[str, FastStats]:
        """State and CPU time of every domain of ours: one call."""
        records = self._bulk(FAST_STATS, NOWAIT, "read domain CPU statistics")
        result: dict[str, FastStats] = {}
        domains: dict[str, libvirt.virDomain] = {}
        for dom, record in records:
            name = dom.name()
            if name.startswith(self.prefix):
                result[name] = parse_fast(name, record)
                domains[name] = dom
        with self._lock:
            self._domains = domains
        return result

    def slow(self) -> dict[str, SlowStats]:
        """Memory, disk and network counters of every running domain of ours: one call."""
        flags = NOWAIT | libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
        records = self._bulk(SLOW_STATS, flags, "read domain memory, disk and network statistics")
        return {
            dom.name(): parse_slow(dom.name(), record)
            for dom, record in records
            if dom.name().startswith(self.prefix)
        }

    def facts(self, name: str) -> DomainFacts | None:
        """The cached facts of ``name``, read from its XML on the first ask after a change."""
        with self._lock:
            cached = self._facts.get(name)
            dom = self._domains.get(name)
        if cached is not None:
            return cached
        if dom is None:
            return None
        try:
            facts = parse_facts(self._call(lambda _conn: dom.XMLDesc(0), f"read the XML of {name}"))
        except TwargaError:
            return None  # the domain went away between the bulk read and now
        with self._lock:
            self._facts[name] = facts
        return facts

    def forget(self, name: str) -> None:
        """Drop the cached facts of ``name`` (it was started, redefined or undefined)."""
        with self._lock:
            self._facts.pop(name, None)


def _int(value: Any) -> int | None:
    return int(value) if value is not None else None


def _kib(element: ET.Element) -> int:
    units = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "kb": 1000 / 1024}
    units.update({"m": 1024, "mib": 1024, "mb": 1000**2 / 1024, "g": 1024**2, "gib": 1024**2})
    factor = units.get((element.get("unit") or "KiB").lower(), 1)
    return int(int(element.text or "0") * factor)


class PoolStatsReader:
    """:class:`DomainStatsReader` over every host of a
    :class:`~twarga_lab.virt.hosts.HostPool`: one bulk call per host; a host that does not
    answer is left out of the read (its VMs are ``unknown`` elsewhere), not an error."""

    def __init__(self, pool: Any, prefix: str) -> None:
        self.pool = pool
        self.prefix = prefix
        self.readers = {
            name: DomainStatsReader(host.backend.call, prefix) for name, host in pool.hosts.items()
        }

    def _each(self, read: Callable[[DomainStatsReader], dict[str, T]]) -> dict[str, T]:
        merged: dict[str, T] = {}
        failures: list[TwargaError] = []
        for name, reader in self.readers.items():
            try:
                found = read(reader)
            except TwargaError as e:
                failures.append(e)
                continue
            for domain, value in found.items():
                if self.pool.host_of(domain).name == name or domain not in merged:
                    merged[domain] = value
        if failures and len(failures) == len(self.readers):
            raise failures[0]
        return merged

    def fast(self) -> dict[str, FastStats]:
        """State and CPU time of every domain of ours, on every host that answers."""
        return self._each(lambda reader: reader.fast())

    def slow(self) -> dict[str, SlowStats]:
        """Memory, disk and network counters of every running domain of ours."""
        return self._each(lambda reader: reader.slow())

    def facts(self, name: str) -> DomainFacts | None:
        """The cached facts of ``name``, from the host it lives on."""
        return self.readers[self.pool.host_of(name).name].facts(name)

    def forget(self, name: str) -> None:
        """Drop the cached facts of ``name`` (its definition changed)."""
        for reader in self.readers.values():
            reader.forget(name)
