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

One module a job: ``trust`` (addresses, trusted senders, origins), ``ingest`` (queues,
rate budgets, the consumer), ``receiver`` (UDP and TCP), ``channels`` (the VMs' virtio
ports) and ``service`` (settings, start and stop, metrics).
"""

from twarga_lab.services.syslog.channels import GuestChannels
from twarga_lab.services.syslog.ingest import (
    MAX_NETWORK_SOURCES,
    OVERFLOW_PEER,
    SyslogIngest,
    TokenBucket,
)
from twarga_lab.services.syslog.receiver import (
    MAX_FRAME,
    MAX_TCP_CLIENTS,
    SyslogReceiver,
    split_lines,
)
from twarga_lab.services.syslog.service import (
    ListenAddress,
    SyslogCollector,
    SyslogService,
    TrustedSourcesMap,
)
from twarga_lab.services.syslog.trust import (
    SECRET_PREFIX,
    SECRET_SD_ID,
    Origin,
    TrustedSources,
    parse_address,
)

__all__ = [
    "MAX_FRAME",
    "MAX_NETWORK_SOURCES",
    "MAX_TCP_CLIENTS",
    "OVERFLOW_PEER",
    "SECRET_PREFIX",
    "SECRET_SD_ID",
    "GuestChannels",
    "ListenAddress",
    "Origin",
    "SyslogCollector",
    "SyslogIngest",
    "SyslogReceiver",
    "SyslogService",
    "TokenBucket",
    "TrustedSources",
    "TrustedSourcesMap",
    "parse_address",
    "split_lines",
]
