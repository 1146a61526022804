"""Syslog into the SOC: a receiver on the network and one channel per running VM.

* The tiny image's syslogd writes into a virtio-serial port (``org.twarga.syslog.0``) whose
  host end is a UNIX socket libvirt creates per domain. The service connects to the socket of
  every running VM (at start-up, on libvirt lifecycle events, and again whenever the
  connection drops while the VM runs), so every line is known to come from that VM. This
  channel is the only source of a VM's security events that needs no configuration.
* The network receiver listens on ``syslog_address`` (default ``127.0.0.1:5514``) over UDP
  (one message per datagram) and TCP (RFC 6587: octet counting ``LEN SP MSG`` or one
  message per line). Every account on the host can reach it and write any hostname, so a
  message's hostname never names a VM. A network message is a VM's only when its sender
  is trusted for that VM in ``syslog_trusted_sources`` (:class:`TrustedSources`): by
  address, or by a shared secret in the RFC 5424 structured data
  ``[twarga@32473 secret="..."]``. Everything else is at most an unattributed ``system``
  event that only admins see: no VM's event, no failure count, no ban.

Each source (a VM's channel, or one sender address) has its own bounded queue and rate
budget, and the consumer takes lines from the sources in turn, so a flooding sender cannot
starve the VMs' channels or other senders. Dropped lines are counted (Prometheus
``twarga_syslog_dropped_lines_total``) and each flood burst raises one warning event. TCP
connections that stay silent, or hold an unfinished message, longer than ``tcp_timeout``
are closed.

Lines are split in a worker thread (:mod:`twarga_lab.services.syslog_format`), the SSH servers'
messages classified (:mod:`twarga_lab.services.sshlog`) and SSH events written to the database
in batches (``SocService.record_ssh``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select
from traitlets import Dict, Float, Int, TraitError, Unicode, observe
from traitlets.config import LoggingConfigurable

from twarga_lab.db import Database
from twarga_lab.db.models import VM, VMStatus, utcnow
from twarga_lab.errors import TwargaError
from twarga_lab.services.background import cancel_and_wait
from twarga_lab.services.soc import FloodNotice, SocService, SshObservation
from twarga_lab.services.sshlog import SshEventKind, SshLogParser
from twarga_lab.services.syslog_format import MAX_LINE, SyslogRecord, parse_syslog
from twarga_lab.virt.backend import DomainState, HypervisorBackend, LifecycleEvent
from twarga_lab.virt.domain import SYSLOG_CHANNEL, channel_socket_path

log = logging.getLogger(__name__)

MAX_TCP_CLIENTS = 64
MAX_FRAME = 64 * 1024
SECRET_SD_ID = "twarga@32473"  # 32473: the example enterprise number of RFC 5612
_SECRET = re.compile(r'\[twarga@32473(?: [^\]]*?)? secret="((?:[^"\\\]]|\\.)*)"')
SECRET_PREFIX = "secret:"
MAX_NETWORK_SOURCES = 1024
OVERFLOW_PEER = "other"


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


class TrustedSources:
    """Which network senders speak for which VM: ``{domain: [entry, ...]}``.

    The key is a VM's libvirt domain name (the ``domain`` field of the VM API). An entry is
    an address or network (``192.0.2.10``, ``10.1.0.0/24``) or ``secret:<token>``: a message
    carrying ``[twarga@32473 secret="<token>"]`` in its RFC 5424 structured data. On a
    shared host every account sends from 127.0.0.1, so trust a loopback address only for a
    VM whose owner is the only one who can run code on this host; use a secret otherwise.

    A message is the VM's when its secret is that VM's, or when its sender's address is
    trusted for that VM alone (several VMs behind one address: the one whose domain the
    hostname names). Anything else is unattributed.
    """

    def __init__(self, mapping: Mapping[str, Iterable[str]] | None = None) -> None:
        self.networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
        self.secrets: list[tuple[bytes, str]] = []
        for domain, entries in (mapping or {}).items():
            if not isinstance(domain, str) or not domain:
                raise ValueError("syslog_trusted_sources: keys are VM domain names")
            if isinstance(entries, str):
                entries = [entries]
            for entry in entries:
                if not isinstance(entry, str):
                    raise ValueError(f"syslog_trusted_sources[{domain!r}]: {entry!r} is no text")
                if entry.startswith(SECRET_PREFIX):
                    secret = entry[len(SECRET_PREFIX) :]
                    if len(secret) < 16 or '"' in secret or "\\" in secret or "]" in secret:
                        raise ValueError(
                            f"syslog_trusted_sources[{domain!r}]: a secret needs 16 or more "
                            'characters and no ", \\ or ]'
                        )
                    if any(hmac.compare_digest(secret.encode(), s) for s, _ in self.secrets):
                        raise ValueError("syslog_trusted_sources: a secret is given twice")
                    self.secrets.append((secret.encode(), domain))
                    continue
                try:
                    network = ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(
                        f"syslog_trusted_sources[{domain!r}]: {entry!r} is neither an "
                        "address, a network nor secret:<token>"
                    ) from None
                self.networks.append((network, domain))

    def __bool__(self) -> bool:
        return bool(self.networks or self.secrets)

    def attribute(self, peer: str | None, record: SyslogRecord) -> str | None:
        """The domain a network message may speak for, or None."""
        if self.secrets and record.structured_data:
            m = _SECRET.search(record.structured_data)
            if m is not None:
                given = m[1].encode()
                for secret, domain in self.secrets:
                    if hmac.compare_digest(given, secret):
                        return domain
        if not self.networks or not peer:
            return None
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return None
        domains = {d for network, d in self.networks if address in network}
        if len(domains) == 1:
            return domains.pop()
        return record.hostname if record.hostname in domains else None


@dataclass(frozen=True)
class Origin:
    """Which stream a line came through."""

    channel: str  # virtio, udp or tcp
    vm_id: int | None = None
    peer: str | None = None

    @property
    def source_key(self) -> tuple[str, Any]:
        """The queue a line waits in: one per VM channel, one per sender address."""
        if self.channel == "virtio":
            return ("virtio", self.vm_id)
        return ("net", self.peer)


class TokenBucket:
    """``rate`` per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class _Source:
    """One sender's queue, budget and flood state."""

    origin: Origin
    bucket: TokenBucket
    queue: deque[tuple[Origin, bytes]] = field(default_factory=deque)
    dropped: int = 0
    burst_dropped: int = 0
    last_drop: float = 0.0
    last_seen: float = 0.0
    flooding: bool = False


class SyslogIngest:
    """Per-source bounded queues, drained in turn; SSH events go to the SOC in batches.

    ``feed`` runs on the event loop and never blocks. Each source may queue ``queue_size``
    lines and send ``rate`` lines a second (bursts of ``burst``; VM channels have their own
    figures); beyond that its lines are dropped and counted, and the first drop of a burst
    (a burst ends after ``flood_quiet`` seconds without drops) records one warning event.
    Network senders may also pick new source addresses (all of 127.0.0.0/8 is theirs), so
    together they queue at most ten sources' worth: memory stays bounded and VM channels,
    which never share that allowance, keep their turns.
    """

    def __init__(
        self,
        soc: SocService,
        queue_size: int = 2000,
        batch: int = 500,
        *,
        trust: TrustedSources | None = None,
        rate: float = 200.0,
        burst: float = 2000.0,
        guest_rate: float = 1000.0,
        guest_burst: float = 5000.0,
        flood_quiet: float = 10.0,
        unattributed_rate: float = 1.0,
        unattributed_burst: float = 60.0,
    ) -> None:
        self.soc = soc
        self.batch = batch
        self.queue_size = queue_size
        self.trust = trust or TrustedSources()
        self.rate, self.burst = rate, burst
        self.guest_rate, self.guest_burst = guest_rate, guest_burst
        self.flood_quiet = flood_quiet
        self.unattributed_rate, self.unattributed_burst = unattributed_rate, unattributed_burst
        self.dropped: dict[str, int] = {"virtio": 0, "network": 0}
        self.network_limit = 10 * queue_size
        self._network_queued = 0
        # Warning events for network floods: ten, then one a minute (a sender hopping
        # addresses starts a "new" flood with each).
        self._flood_events = TokenBucket(1 / 60, 10)
        self.unattributed_dropped = 0
        self.recorded = 0
        self.floods = 0
        self._sources: dict[tuple[str, Any], _Source] = {}
        self._ready: deque[tuple[str, Any]] = deque()  # sources with queued lines, in turn
        self._notices: list[FloodNotice] = []
        self._wake = asyncio.Event()
        self._stopping = False
        # Touched only in the consumer's worker thread (one batch at a time).
        self._parsers: dict[tuple[str, Any], SshLogParser] = {}
        self._unattributed: dict[str | None, TokenBucket] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return sum(len(s.queue) for s in self._sources.values())

    def feed(self, origin: Origin, line: bytes) -> None:
        """Queue one line (without its newline), or drop it if its source is over budget."""
        key = origin.source_key
        src = self._sources.get(key)
        now = time.monotonic()
        if src is None:
            if key[0] == "net" and len(self._sources) >= MAX_NETWORK_SOURCES:
                key = ("net", OVERFLOW_PEER)
                src = self._sources.get(key)
            if src is None:
                guest = origin.channel == "virtio"
                bucket = TokenBucket(
                    self.guest_rate if guest else self.rate,
                    self.guest_burst if guest else self.burst,
                )
                src = self._sources[key] = _Source(origin, bucket)
        src.last_seen = now
        network = key[0] == "net"
        if (
            len(src.queue) >= self.queue_size
            or (network and self._network_queued >= self.network_limit)
            or not src.bucket.take(now)
        ):
            self._drop(key, src, now)
            return
        if not src.queue:
            self._ready.append(key)
        src.queue.append((origin, line))
        if network:
            self._network_queued += 1
        self._wake.set()

    def _drop(self, key: tuple[str, Any], src: _Source, now: float) -> None:
        src.dropped += 1
        src.burst_dropped += 1
        src.last_drop = now
        self.dropped["virtio" if key[0] == "virtio" else "network"] += 1
        if not src.flooding:
            src.flooding = True
            self.floods += 1
            origin = src.origin
            log.warning(
                "syslog flood from %s %s: dropping lines",
                origin.channel, origin.vm_id if key[0] == "virtio" else key[1],
            )  # fmt: skip
            if key[0] == "net" and not self._flood_events.take(now):
                return
            peer = None if key[0] == "virtio" else key[1]
            notice = FloodNotice(
                origin.channel, origin.vm_id, peer, self.queue_size, src.bucket.rate
            )
            self._notices.append(notice)
            self._wake.set()

    def _end_quiet_bursts(self, now: float) -> None:
        for key, src in list(self._sources.items()):
            if src.flooding and now - src.last_drop >= self.flood_quiet:
                log.warning(
                    "syslog flood from %s is over: %d lines dropped", key[1], src.burst_dropped
                )
                src.flooding = False
                src.burst_dropped = 0
            if (
                key[0] == "net" and not src.queue and not src.flooding
                and now - src.last_seen > max(60.0, self.flood_quiet)
            ):  # fmt: skip
                del self._sources[key]  # an idle sender: its budget is full again anyway

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.ensure_future(self._consume())

    async def stop(self) -> None:
        """Record what is already queued, then stop."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=30)
        except TimeoutError:
            await cancel_and_wait(self._task)
        self._task = None

    def _take(self) -> list[tuple[Origin, bytes]]:
        """Up to ``batch`` lines, one from each source in turn."""
        items: list[tuple[Origin, bytes]] = []
        while self._ready and len(items) < self.batch:
            key = self._ready.popleft()
            src = self._sources.get(key)
            if src is None or not src.queue:
                continue
            items.append(src.queue.popleft())
            if key[0] == "net":
                self._network_queued -= 1
            if src.queue:
                self._ready.append(key)
        return items

    def _observe(self, origin: Origin, line: bytes) -> SshObservation | None:
        if b"sshd" not in line and b"dropbear" not in line:
            return None  # most of a syslog stream
        record = parse_syslog(line)
        if record is None:
            return None
        domain = None
        if origin.channel == "virtio":
            key: tuple[str, Any] = ("virtio", origin.vm_id)
        else:
            domain = self.trust.attribute(origin.peer, record) if self.trust else None
            key = ("net", domain)  # dropbear pids mean something within one machine only
        parser = self._parsers.get(key)
        if parser is None:
            parser = self._parsers[key] = SshLogParser()
        event = parser.classify(record)
        if event is None or event.kind is SshEventKind.connection:
            return None
        if origin.channel != "virtio" and domain is None:
            bucket = self._unattributed.get(origin.peer)
            if bucket is None:
                if len(self._unattributed) >= MAX_NETWORK_SOURCES:
                    self._unattributed.clear()
                bucket = self._unattributed[origin.peer] = TokenBucket(
                    self.unattributed_rate, self.unattributed_burst
                )
            if not bucket.take(time.monotonic()):
                self.unattributed_dropped += 1
                return None
        return SshObservation(event, origin.channel, origin.vm_id, origin.peer, domain=domain)

    def _process(self, items: list[tuple[Origin, bytes]], notices: list[FloodNotice]) -> int:
        # In a worker thread, one batch at a time: parsing stays off the event loop, and
        # the parsers are only ever touched here.
        observations = [o for o in (self._observe(*item) for item in items) if o]
        written = self.soc.record_ssh(observations) if observations else 0
        if notices:
            written += self.soc.record_floods(notices)
        return written

    async def _consume(self) -> None:
        while True:
            now = time.monotonic()
            self._end_quiet_bursts(now)
            items = self._take()
            notices, self._notices = self._notices, []
            if not items and not notices:
                if self._stopping:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                continue
            try:
                self.recorded += await asyncio.to_thread(self._process, items, notices)
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
    """UDP and TCP syslog on one address; a TCP client silent (or stuck in the middle of
    a message) for ``tcp_timeout`` seconds is disconnected."""

    def __init__(
        self, ingest: SyslogIngest, host: str, port: int, *, tcp_timeout: float = 60.0
    ) -> None:
        self.ingest = ingest
        self.host = host
        self.port = port
        self.tcp_timeout = tcp_timeout
        self.udp_port: int | None = None
        self.tcp_port: int | None = None
        self.timeouts = 0
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
        loop = asyncio.get_running_loop()
        buffer = bytearray()
        partial_since: float | None = None  # when the unfinished message began
        try:
            while True:
                now = loop.time()
                timeout = self.tcp_timeout
                if partial_since is not None:
                    timeout = max(0.0, partial_since + self.tcp_timeout - now)
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), timeout)
                except TimeoutError:
                    self.timeouts += 1
                    log.info(
                        "syslog: closing TCP connection from %s after %g s without a "
                        "complete message", origin.peer, self.tcp_timeout,
                    )  # fmt: skip
                    break
                if not chunk:
                    break
                before = len(buffer) + len(chunk)
                buffer += chunk
                if not self._frames(buffer, origin):
                    break  # a broken octet count: the stream cannot be resynchronised
                if not buffer:
                    partial_since = None
                elif partial_since is None or len(buffer) < before:
                    partial_since = loop.time()  # a message completed; a new one began
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


class ListenAddress(Unicode):
    """A trait: ``IP:PORT`` to listen on, or empty for none (see :func:`parse_address`)."""

    info_text = "an IP:PORT address, or empty"

    def validate(self, obj: Any, value: Any) -> str:
        value = super().validate(obj, value)
        try:
            parse_address(value)
        except ValueError as e:
            raise TraitError(str(e)) from None
        return str(value).strip()


class TrustedSourcesMap(Dict):
    """A trait: ``{domain: [entry, ...]}`` that :class:`TrustedSources` accepts."""

    def validate(self, obj: Any, value: Any) -> dict[str, Any]:
        value = super().validate(obj, value)
        try:
            TrustedSources(value)
        except (ValueError, TypeError) as e:
            raise TraitError(str(e)) from None
        return dict(value)


class SyslogService(LoggingConfigurable):
    """The network receiver, the VMs' channels, the ingest queues and the SOC's pruning,
    started together."""

    address = ListenAddress(
        "127.0.0.1:5514",
        help="""Where the SOC listens for syslog over UDP and TCP (RFC 3164/5424, RFC 6587
        framing), as ``IP:PORT``; empty turns the network receiver off. The tiny image's
        guests do not need it: each sends its syslog over its own virtio channel.""",
    ).tag(config=True)
    trusted_sources = TrustedSourcesMap(
        {},
        help="""Network syslog senders allowed to speak for a VM, as ``{domain: [entry, ...]}``
        with the VM's libvirt domain name (the API's ``domain``) as key. An entry is an address
        or network (``"192.0.2.10"``, ``"10.1.0.0/24"``) or ``"secret:<16+ characters>"``,
        which a message carries as RFC 5424 structured data ``[twarga@32473
        secret="..."]``. Off (empty) by default: every account on the host can reach the
        receiver and write any hostname, so network messages are then never a VM's events,
        failure counts or bans (at most an unattributed system event for admins); a VM's
        own virtio channel needs no entry. Trust 127.0.0.1 only where no other account can
        run code on the host. Changes apply at once.""",
    ).tag(config=True)
    source_queue_size = Int(
        2000,
        help="""Syslog lines one source (a VM's channel, or one sender address on the network)
        may have waiting; beyond it, and beyond its rate, its lines are dropped and counted
        (``twarga_syslog_dropped_lines_total``) with one warning event per flood burst, so a
        flooding source cannot delay the others.""",
    ).tag(config=True)
    source_rate = Float(
        200.0,
        help="""Lines a second one network sender may send (bursts of ten times as many);
        a VM's channel may send 1000 a second (bursts of 5000).""",
    ).tag(config=True)
    tcp_timeout = Float(
        60.0,
        help="""Seconds a TCP syslog connection may stay silent, or hold an unfinished
        message, before it is closed.""",
    ).tag(config=True)

    def __init__(
        self,
        soc: SocService,
        db: Database,
        backend: HypervisorBackend,
        *,
        domain_prefix: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.soc = soc
        self.ingest = SyslogIngest(
            soc,
            self.source_queue_size,
            trust=TrustedSources(self.trusted_sources),
            rate=self.source_rate,
            burst=max(10 * self.source_rate, 1.0),
        )
        self.channels = GuestChannels(db, backend, self.ingest, domain_prefix)
        self.receiver: SyslogReceiver | None = None
        self.pruned_events = 0
        self.pruned_failures = 0
        self._pruner: asyncio.Task[None] | None = None

    @observe("trusted_sources")
    def _trusted_sources_changed(self, change: Any) -> None:
        if hasattr(self, "ingest"):  # not while the constructor loads the config
            self.ingest.trust = TrustedSources(change["new"])

    def set_trusted_sources(self, mapping: Mapping[str, Iterable[str]]) -> None:
        """Replace the trusted senders (validated like the setting)."""
        self.trusted_sources = dict(mapping)

    async def start(self) -> None:
        self.ingest.start()
        address = parse_address(self.address)
        if address is not None:
            receiver = SyslogReceiver(self.ingest, *address, tcp_timeout=self.tcp_timeout)
            try:
                await receiver.start()
            except OSError as e:
                await receiver.stop()
                log.error(
                    "Twarga Lab: cannot listen for syslog on %s:%s (%s); guests' channels "
                    "still work", *address, e,
                )  # fmt: skip
            else:
                self.receiver = receiver
                log.info(
                    "Twarga Lab: syslog on %s udp/%s tcp/%s",
                    receiver.host, receiver.udp_port, receiver.tcp_port,
                )  # fmt: skip
        await self.channels.start()
        if self._pruner is None and self.soc.prune_interval > 0:
            self._pruner = asyncio.ensure_future(self._prune_loop())

    def prune(self) -> tuple[int, int]:
        """Delete events past their retention and failures past findtime (blocking)."""
        events, failures = self.soc.prune(timedelta(days=self.soc.event_retention_days), utcnow())
        self.pruned_events += events
        self.pruned_failures += failures
        return events, failures

    async def _prune_loop(self) -> None:
        while True:
            try:
                events, failures = await asyncio.to_thread(self.prune)
                if events or failures:
                    log.info("SOC: pruned %d old events and %d old failures", events, failures)
            except Exception:
                log.exception("SOC: pruning old events failed")
            await asyncio.sleep(self.soc.prune_interval)

    async def stop(self) -> None:
        await cancel_and_wait(self._pruner)
        self._pruner = None
        await self.channels.stop()
        if self.receiver is not None:
            await self.receiver.stop()
        await self.ingest.stop()


class SyslogCollector(Collector):
    """The receiver's counters for Prometheus (registered with the metrics exposition)."""

    def __init__(self, service: SyslogService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        ingest = self.service.ingest
        dropped = CounterMetricFamily(
            "twarga_syslog_dropped_lines",
            "Syslog lines dropped because their source was over its queue or rate budget.",
            labels=["channel"],
        )
        for channel, count in ingest.dropped.items():
            dropped.add_metric([channel], count)
        yield dropped
        yield CounterMetricFamily(
            "twarga_syslog_floods",
            "Flood bursts (each raised one warning event).",
            value=ingest.floods,
        )
        yield CounterMetricFamily(
            "twarga_syslog_unattributed_dropped",
            "Unattributed SSH lines from the network not recorded (over their budget).",
            value=ingest.unattributed_dropped,
        )
        receiver = self.service.receiver
        yield CounterMetricFamily(
            "twarga_syslog_tcp_timeouts",
            "TCP syslog connections closed for silence or an unfinished message.",
            value=receiver.timeouts if receiver is not None else 0,
        )
        yield GaugeMetricFamily(
            "twarga_syslog_queued_lines", "Syslog lines waiting to be parsed.", value=ingest.queued
        )
