"""The ingest queues: one bounded queue and token bucket per source (a VM's channel or one
sender address), taken in turn by one consumer that parses lines in a worker thread and
records SSH events in batches, so a flooding source cannot starve the others."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twarga_lab.services.background import cancel_and_wait
from twarga_lab.services.soc import FloodNotice, SocService, SshObservation
from twarga_lab.services.sshlog import SshEventKind, SshLogParser
from twarga_lab.services.syslog.trust import Origin, TrustedSources
from twarga_lab.services.syslog_format import parse_syslog

log = logging.getLogger(__name__)


MAX_NETWORK_SOURCES = 1024
OVERFLOW_PEER = "other"


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
