"""Syslog into the SOC: a receiver on the network and one channel per running VM.

* The network receiver listens on ``syslog_address`` (default ``127.0.0.1:5514``) over UDP
  (one message per datagram) and TCP (RFC 6587: octet counting ``LEN SP MSG`` or one
  message per line). A message names its VM only by hostname, which anyone on the host can
  forge and which is unique per user only, so it is tied to a VM only when the hostname is
  a domain name or a VM name nobody else uses.
* The tiny image's syslogd writes into a virtio-serial port (``org.twarga.syslog.0``) whose
  host end is a UNIX socket libvirt creates per domain. The service connects to the socket of
  every running VM (at start-up, on libvirt lifecycle events, and again whenever the
  connection drops while the VM runs), so every line is known to come from that VM.

Lines are parsed on the event loop (:mod:`twarga_lab.services.sshlog`) and SSH events are
written to the database in batches from a worker thread (``SocService.record_ssh``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from twarga_lab.db import Database
from twarga_lab.db.models import VM, VMStatus
from twarga_lab.errors import TwargaError
from twarga_lab.services.soc import SocService, SshObservation
from twarga_lab.services.sshlog import MAX_LINE, SshEventKind, SshLogParser
from twarga_lab.virt.backend import DomainState, HypervisorBackend, LifecycleEvent
from twarga_lab.virt.domain import SYSLOG_CHANNEL, channel_socket_path

log = logging.getLogger(__name__)

MAX_TCP_CLIENTS = 64
MAX_FRAME = 64 * 1024


def parse_address(address: str) -> tuple[str, int] | None:
    """``"127.0.0.1:5514"`` -> ("127.0.0.1", 5514); ``""`` -> None (receiver off).

    Raises ValueError for anything else; IPv6 addresses go in brackets (``[::1]:5514``).
    """
    address = address.strip()
    if not address:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"syslog_address must be HOST:PORT, not {address!r}")
    host = host.strip("[]")
    ipaddress.ip_address(host)  # an address, not a name: nothing to resolve
    return host, int(port)


@dataclass(frozen=True)
class Origin:
    """Which stream a line came through."""

    channel: str  # virtio, udp or tcp
    vm_id: int | None = None
    peer: str | None = None


class SyslogIngest:
    """Parses lines per stream and hands SSH events to the SOC in batches.

    ``feed`` is called on the event loop and never blocks: beyond ``queue_size`` pending
    lines, new ones are dropped (and counted) rather than letting a flood grow memory.
    """

    def __init__(self, soc: SocService, queue_size: int = 20000, batch: int = 500) -> None:
        self.soc = soc
        self.batch = batch
        self.dropped = 0
        self.recorded = 0
        # None is the consumer's signal to finish what is queued and stop.
        self._queue: asyncio.Queue[tuple[Origin, bytes] | None] = asyncio.Queue(queue_size)
        self._parsers: dict[int | None, SshLogParser] = {}
        self._task: asyncio.Task[None] | None = None

    def feed(self, origin: Origin, line: bytes) -> None:
        """Queue one line (without its newline)."""
        try:
            self._queue.put_nowait((origin, line))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped in (1, 1000) or self.dropped % 100000 == 0:
                log.warning("syslog queue full: %d lines dropped so far", self.dropped)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._consume())

    async def stop(self) -> None:
        """Record what is already queued, then stop (cancel if the queue is full)."""
        if self._task is None:
            return
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def _observe(self, origin: Origin, line: bytes) -> SshObservation | None:
        # Network streams share one parser: it keys dropbear pids by hostname itself.
        key = origin.vm_id if origin.channel == "virtio" else None
        parser = self._parsers.get(key)
        if parser is None:
            parser = self._parsers[key] = SshLogParser()
        event = parser.parse_line(line)
        if event is None or event.kind is SshEventKind.connection:
            return None
        return SshObservation(event, origin.channel, origin.vm_id, origin.peer)

    def _process(self, items: list[tuple[Origin, bytes]]) -> int:
        # In a worker thread, one batch at a time: parsing stays off the event loop, and
        # the parsers are only ever touched here.
        observations = [o for o in (self._observe(*item) for item in items) if o]
        return self.soc.record_ssh(observations) if observations else 0

    async def _consume(self) -> None:
        finished = False
        while not finished:
            item = await self._queue.get()
            items: list[tuple[Origin, bytes]] = []
            while True:
                if item is None:
                    finished = True
                    break
                items.append(item)
                if len(items) >= self.batch or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            try:
                self.recorded += await asyncio.to_thread(self._process, items)
            except Exception:
                log.exception("could not record a batch of %d syslog lines", len(items))


def split_lines(buffer: bytearray, feed: Callable[[bytes], None]) -> None:
    """Feed every complete line of ``buffer`` and keep the rest; an over-long line is cut."""
    while True:
        end = buffer.find(b"\n")
        if end < 0:
            if len(buffer) > MAX_LINE:
                feed(bytes(buffer[:MAX_LINE]))
                del buffer[:]
            return
        line = bytes(buffer[:end]).rstrip(b"\r\x00")
        del buffer[: end + 1]
        if line:
            feed(line[:MAX_LINE])


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, ingest: SyslogIngest) -> None:
        self.ingest = ingest

    def datagram_received(self, data: bytes, addr: Any) -> None:
        origin = Origin("udp", peer=str(addr[0]))
        for line in data.split(b"\n"):
            line = line.rstrip(b"\r\x00")
            if line:
                self.ingest.feed(origin, line[:MAX_LINE])


class SyslogReceiver:
    """UDP and TCP syslog on one address."""

    def __init__(self, ingest: SyslogIngest, host: str, port: int) -> None:
        self.ingest = ingest
        self.host = host
        self.port = port
        self.udp_port: int | None = None
        self.tcp_port: int | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Bind both sockets; with port 0 each gets its own free port."""
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _UDPProtocol(self.ingest), local_addr=(self.host, self.port)
        )
        self.udp_port = self._udp.get_extra_info("sockname")[1]
        self._tcp = await asyncio.start_server(self._client, self.host, self.port)
        self.tcp_port = self._tcp.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._clients):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._tcp.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._clients) >= MAX_TCP_CLIENTS or task is None:
            writer.close()
            return
        self._clients.add(task)
        peer = writer.get_extra_info("peername")
        origin = Origin("tcp", peer=str(peer[0]) if peer else None)
        buffer = bytearray()
        try:
            while chunk := await reader.read(65536):
                buffer += chunk
                if not self._frames(buffer, origin):
                    break  # a broken octet count: the stream cannot be resynchronised
        except (ConnectionError, asyncio.CancelledError):
            pass  # the sender went away or we are stopping: what arrived is kept
        finally:
            self._clients.discard(task)
            writer.close()

    def _frames(self, buffer: bytearray, origin: Origin) -> bool:
        """Feed the complete messages of ``buffer``; False when the framing is broken."""
        while buffer:
            if buffer[:1].isdigit():  # RFC 6587 octet counting: "LEN SP MSG"
                space = buffer.find(b" ", 0, 7)
                if space < 0:
                    return len(buffer) < 7
                length = int(buffer[:space]) if buffer[:space].isdigit() else -1
                if not 0 < length <= MAX_FRAME:
                    return False
                if len(buffer) < space + 1 + length:
                    return True
                message = bytes(buffer[space + 1 : space + 1 + length])
                del buffer[: space + 1 + length]
                for line in message.split(b"\n"):
                    if line.strip():
                        self.ingest.feed(origin, line.rstrip(b"\r\x00")[:MAX_LINE])
            else:  # non-transparent framing: one message per line
                end = buffer.find(b"\n")
                if end < 0:
                    return len(buffer) <= MAX_FRAME
                line = bytes(buffer[:end]).rstrip(b"\r\x00")
                del buffer[: end + 1]
                if line:
                    self.ingest.feed(origin, line[:MAX_LINE])
        return True


class LineBudget:
    """At most ``rate`` lines a second (bursts of ``burst``) from one guest; the rest is
    dropped, so a guest flooding its channel cannot flood the database."""

    def __init__(
        self, feed: Callable[[bytes], None], name: str, rate: float = 1000, burst: float = 5000
    ) -> None:
        self.feed, self.name, self.rate, self.burst = feed, name, rate, burst
        self.tokens = burst
        self.stamp = time.monotonic()
        self.dropped = 0

    def __call__(self, line: bytes) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.feed(line)
            return
        self.dropped += 1
        if self.dropped in (1, 10000) or self.dropped % 1000000 == 0:
            log.warning("%s floods its syslog channel: %d lines dropped", self.name, self.dropped)


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
        add_reconnect = getattr(self.backend, "add_reconnect_listener", None)
        if add_reconnect is not None:
            add_reconnect(self._on_reconnect_thread)
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
        domain_xml = getattr(self.backend, "domain_xml", None)
        if domain_xml is None:
            return None
        try:
            path = channel_socket_path(domain_xml(domain), SYSLOG_CHANNEL)
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
            feed = LineBudget(
                functools.partial(self.ingest.feed, Origin("virtio", vm_id=vm_id)), domain
            )
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


class SyslogService:
    """The network receiver, the VMs' channels and the ingest queue, started together."""

    def __init__(
        self,
        soc: SocService,
        db: Database,
        backend: HypervisorBackend,
        *,
        address: str,
        domain_prefix: str,
    ) -> None:
        self.soc = soc
        self.address = parse_address(address)
        self.ingest = SyslogIngest(soc)
        self.channels = GuestChannels(db, backend, self.ingest, domain_prefix)
        self.receiver: SyslogReceiver | None = None

    async def start(self) -> None:
        self.ingest.start()
        if self.address is not None:
            receiver = SyslogReceiver(self.ingest, *self.address)
            try:
                await receiver.start()
            except OSError as e:
                await receiver.stop()
                log.error(
                    "Twarga Lab: cannot listen for syslog on %s:%s (%s); guests' channels "
                    "still work", *self.address, e,
                )  # fmt: skip
            else:
                self.receiver = receiver
                log.info(
                    "Twarga Lab: syslog on %s udp/%s tcp/%s",
                    receiver.host, receiver.udp_port, receiver.tcp_port,
                )  # fmt: skip
        await self.channels.start()

    async def stop(self) -> None:
        await self.channels.stop()
        if self.receiver is not None:
            await self.receiver.stop()
        await self.ingest.stop()
