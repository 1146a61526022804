"""The VMs' own syslog channels: the host end (a UNIX socket libvirt makes per domain) of
each running VM's virtio-serial port ``org.twarga.syslog.0``, connected at start-up, on
lifecycle events and whenever it drops while the VM runs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from sqlalchemy import select

from twarga_lab.db import Database
from twarga_lab.db.models import VM, VMStatus
from twarga_lab.errors import TwargaError
from twarga_lab.services.syslog.ingest import SyslogIngest
from twarga_lab.services.syslog.receiver import split_lines
from twarga_lab.services.syslog.trust import Origin
from twarga_lab.virt.backend import DomainState, HypervisorBackend, LifecycleEvent
from twarga_lab.virt.domain import SYSLOG_CHANNEL, channel_socket_path

log = logging.getLogger(__name__)


class GuestChannels:
    """One reader per running VM on its syslog channel's UNIX socket."""

    def __init__(
        self, db: Database, backend: HypervisorBackend, ingest: SyslogIngest, domain_prefix: str
    ) -> None:
        self.db = db
        self.backend = backend
        self.ingest = ingest
        self.domain_prefix = domain_prefix
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connected: dict[str, asyncio.Event] = {}
        self._closing = False

    async def start(self) -> None:
        """Follow libvirt's lifecycle events; attach to every VM running now."""
        self._loop = asyncio.get_running_loop()
        self.backend.add_lifecycle_listener(self._on_lifecycle_thread)
        self.backend.add_reconnect_listener(self._on_reconnect_thread)
        await self.attach_running()

    async def attach_running(self) -> None:
        """Attach to every running Twarga domain (at start and after libvirt came back)."""
        try:
            states = await asyncio.to_thread(self.backend.states, self.domain_prefix)
        except TwargaError as e:
            log.warning("cannot list domains for their syslog channels: %s", e.message)
            return
        for domain, state in states.items():
            if state is DomainState.running:
                self.attach(domain)

    def _on_reconnect_thread(self) -> None:
        if self._loop is not None and not self._closing:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(
                    lambda: asyncio.ensure_future(self.attach_running())
                )

    async def stop(self) -> None:
        self._closing = True
        tasks = list(self._readers.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._readers.clear()

    def _on_lifecycle_thread(self, event: LifecycleEvent) -> None:
        # libvirt's event thread: hop onto the loop.
        if self._loop is None or self._closing or not event.domain.startswith(self.domain_prefix):
            return
        if event.state is DomainState.running:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(self.attach, event.domain)

    def attach(self, domain: str) -> None:
        """Read ``domain``'s channel (no-op if a reader runs already)."""
        task = self._readers.get(domain)
        if self._closing or (task is not None and not task.done()):
            return
        self.connected.setdefault(domain, asyncio.Event()).clear()
        self._readers[domain] = asyncio.ensure_future(self._read(domain))

    def _resolve(self, domain: str) -> tuple[int, str] | None:
        """The VM id and channel socket of a running Twarga domain, or None."""
        with self.db.session() as session:
            vm_id = session.scalar(
                select(VM.id).where(VM.domain_name == domain, VM.status != VMStatus.destroyed)
            )
        if vm_id is None or self.backend.state(domain) is not DomainState.running:
            return None
        try:
            path = channel_socket_path(self.backend.domain_xml(domain), SYSLOG_CHANNEL)
        except TwargaError:
            return None
        return (vm_id, path) if path else None

    async def _read(self, domain: str) -> None:
        delay = 0.1
        while not self._closing:
            target = await asyncio.to_thread(self._resolve, domain)
            if target is None:
                return  # not running (any more), or no channel: the next start attaches
            vm_id, path = target
            try:
                reader, writer = await asyncio.open_unix_connection(path)
            except OSError as e:
                log.debug("channel of %s not ready (%s); retrying", domain, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            log.info("reading the syslog channel of %s", domain)
            self.connected[domain].set()
            feed = functools.partial(self.ingest.feed, Origin("virtio", vm_id=vm_id))
            buffer = bytearray()
            try:
                while chunk := await reader.read(65536):
                    buffer += chunk
                    split_lines(buffer, feed)
            except ConnectionError:
                pass  # the VM stopped: its channel reconnects when it runs again
            finally:
                self.connected[domain].clear()
                writer.close()
            await asyncio.sleep(0.2)  # QEMU closed it: stopped, or restarted under us
