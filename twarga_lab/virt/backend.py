"""The interface services use to drive a hypervisor, and Twarga's own domain states."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from twarga_lab.virt.domain import DomainSpec


class DomainState(enum.StrEnum):
    """A domain's state as Twarga understands it, whatever the hypervisor calls it."""

    running = "running"
    paused = "paused"
    shutting_down = "shutting_down"
    shutoff = "shutoff"
    crashed = "crashed"
    missing = "missing"  # no such domain
    unknown = "unknown"


@dataclass(frozen=True)
class LifecycleEvent:
    """A domain changed state; ``detail`` is the hypervisor's reason in words."""

    domain: str
    state: DomainState
    detail: str


LifecycleListener = Callable[[LifecycleEvent], None]


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
    def close(self) -> None:
        """Release the connection and stop background threads."""
