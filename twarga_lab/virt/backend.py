"""The interface services use to drive a hypervisor, and Twarga's own domain states."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from twarga_lab.virt.domain import DomainSpec
from twarga_lab.virt.snapshot import SnapshotInfo


class DomainState(enum.StrEnum):
    """A domain's state as Twarga understands it, whatever the hypervisor calls it."""

    running = "running"
    paused = "paused"
    shutting_down = "shutting_down"
    shutoff = "shutoff"
    crashed = "crashed"
    missing = "missing"  # no such domain
    unknown = "unknown"
    unreachable = "unreachable"  # its host's libvirtd does not answer (HostPool)


@dataclass(frozen=True)
class LifecycleEvent:
    """A domain changed state; ``detail`` is the hypervisor's reason in words."""

    domain: str
    state: DomainState
    detail: str


LifecycleListener = Callable[[LifecycleEvent], None]
ReconnectListener = Callable[[], None]
T = TypeVar("T")


class ConsoleChannel(Protocol):
    """An attached serial console (``virt.console_stream.ConsoleStream`` for libvirt)."""

    def write(self, data: bytes) -> None:
        """Send keystrokes to the guest."""

    def set_reading(self, reading: bool) -> None:
        """Pause (False) or resume (True) reading the guest's output."""

    def close(self) -> None:
        """Detach from the console (a round trip to the hypervisor: not on the event loop)."""


class HypervisorBackend(ABC):
    """What services need from a hypervisor. Methods block: call them from a worker thread.

    Errors are :mod:`twarga_lab.errors` exceptions: ``NotFound`` for a missing domain,
    ``BackendUnavailable`` when the hypervisor cannot be reached, ``BackendError`` otherwise.
    Lifecycle methods are idempotent: starting a running domain is not an error.
    """

    uri: str

    @abstractmethod
    def define(self, spec: DomainSpec) -> None:
        """Define (or redefine) the persistent domain ``spec.name``."""

    @abstractmethod
    def start(self, name: str) -> None:
        """Start a defined domain; nothing happens if it runs already."""

    @abstractmethod
    def shutdown(self, name: str) -> None:
        """Ask the guest to power off (ACPI); nothing happens if it is off."""

    @abstractmethod
    def destroy(self, name: str) -> None:
        """Pull the plug; nothing happens if it is off."""

    @abstractmethod
    def reboot(self, name: str) -> None:
        """Reset a running guest."""

    @abstractmethod
    def undefine(self, name: str) -> None:
        """Forget the domain (it must be off); nothing happens if it does not exist."""

    @abstractmethod
    def state(self, name: str) -> DomainState:
        """The domain's state, ``DomainState.missing`` if it does not exist."""

    @abstractmethod
    def states(self, prefix: str = "") -> dict[str, DomainState]:
        """The state of every domain whose name starts with ``prefix``, in one call."""

    @abstractmethod
    def add_lifecycle_listener(self, listener: LifecycleListener) -> None:
        """Call ``listener`` (from the backend's own thread) on every domain state change."""

    @abstractmethod
    def add_reconnect_listener(self, listener: ReconnectListener) -> None:
        """Call ``listener`` (from the backend's own thread) after the connection to the
        hypervisor came back, e.g. after a libvirtd restart: events may have been missed."""

    @abstractmethod
    def domain_xml(self, name: str) -> str:
        """The live XML description of a domain; ``NotFound`` if it does not exist."""

    @abstractmethod
    def open_console(
        self,
        name: str,
        on_output: Callable[[bytes], None],
        on_closed: Callable[[str], None],
    ) -> ConsoleChannel:
        """Attach to a domain's serial console, taking it over from any other session.

        ``on_output(data)`` and ``on_closed(reason)`` are called from the backend's own
        thread; ``NotFound`` if the domain does not exist.
        """

    @abstractmethod
    def snapshot_create(self, name: str, snapshot_name: str, description: str) -> SnapshotInfo:
        """Take an internal snapshot of domain ``name``'s ``vda`` (with its memory if it
        runs); ``Conflict`` if libvirt refuses (a duplicate name, a busy domain)."""

    @abstractmethod
    def snapshots(self, name: str) -> list[SnapshotInfo]:
        """The snapshots of domain ``name``, oldest first."""

    @abstractmethod
    def snapshot_revert(self, name: str, snapshot_name: str) -> None:
        """Put domain ``name`` back to a snapshot (running again if it ran when taken);
        ``NotFound`` (reason ``no_snapshot``) if there is no such snapshot."""

    @abstractmethod
    def snapshot_delete(self, name: str, snapshot_name: str) -> None:
        """Delete one snapshot; ``NotFound`` (reason ``no_snapshot``) if there is none."""

    @abstractmethod
    def call(self, fn: Callable[[Any], T], action: str) -> T:
        """Run ``fn(connection)`` with the hypervisor's raw connection (``libvirt.virConnect``
        for libvirt), translating its errors; ``action`` names it in error messages
        ("could not <action>"). For bulk readers such as ``virt.stats.DomainStatsReader``."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection and stop background threads."""
