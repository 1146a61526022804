"""Who may speak for a VM on the network: listen addresses, trusted senders (by address
or by the shared secret in RFC 5424 structured data) and a line's origin."""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twarga_lab.services.syslog_format import SyslogRecord

SECRET_SD_ID = "twarga@32473"  # 32473: the example enterprise number of RFC 5612
_SECRET = re.compile(r'\[twarga@32473(?: [^\]]*?)? secret="((?:[^"\\\]]|\\.)*)"')
SECRET_PREFIX = "secret:"


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
