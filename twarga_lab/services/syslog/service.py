"""The syslog service: its settings, the receiver, the channels, the ingest and the SOC's
pruning started and stopped together, and its Prometheus collector."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator, Mapping
from datetime import timedelta
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from traitlets import Dict, Float, Int, TraitError, Unicode, observe
from traitlets.config import LoggingConfigurable

from twarga_lab.db import Database
from twarga_lab.db.models import utcnow
from twarga_lab.services.background import cancel_and_wait
from twarga_lab.services.soc import SocService
from twarga_lab.services.syslog.channels import GuestChannels
from twarga_lab.services.syslog.ingest import SyslogIngest
from twarga_lab.services.syslog.receiver import SyslogReceiver
from twarga_lab.services.syslog.trust import TrustedSources, parse_address
from twarga_lab.virt.backend import HypervisorBackend

log = logging.getLogger(__name__)


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
