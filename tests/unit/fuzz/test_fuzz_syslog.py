"""The syslog parsers under hostile input: any bytes or text never make the RFC 3164/5424
splitter or the SSH rules raise, and a network line is attributed to a VM only through the
trust configured for it (its sender address, or its secret in the structured data), never
through a hostname, a near-miss secret or another VM's trust."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.fuzz import fuzz, ran
from twarga_lab.services.sshlog import SshLogParser
from twarga_lab.services.syslog import Origin, SyslogIngest, TrustedSources
from twarga_lab.services.syslog_format import MAX_LINE, SyslogRecord, parse_syslog

HOSTILE = [
    "<", ">", "<13>", "<999999>", "<1>1 ", "1 ", "-", "[", "]", '"', "\\", '\\"', "\\]", "=",
    " ", "\t", "\n", "\r", "\x00", "\xff", "\ufeff", "\ud800", "é", "😀", ":", "[123]",
    "sshd", "sshd[1]: ", "dropbear", "dropbear[7]: ", "Failed password for root from ",
    "Accepted publickey for x from ", "Invalid user ", "Bad password attempt for 'a' from ",
    "Child connection from ", "Login attempt for nonexistent user", " port 22", "1.2.3.4",
    "::1", "[::1]:22", "Dec  3 07:00:00 ", "2026-12-03T07:00:00Z ", "auth.info ",
    "[twarga@32473 secret=\"", "secret=", "twarga@32473", " [preauth]", " ssh2",
]  # fmt: skip
HOSTILE_CHARS = sorted({c for piece in HOSTILE for c in piece})
hostile_text = st.one_of(
    st.text(st.characters() | st.sampled_from(HOSTILE_CHARS), max_size=30),
    st.lists(st.sampled_from(HOSTILE), max_size=12).map("".join),
)
lines = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    hostile_text,
    hostile_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.tuples(st.sampled_from(HOSTILE), st.integers(1, MAX_LINE // 2)).map(lambda p: p[0] * p[1]),
)


@fuzz(50_000)
@given(lines)
def test_no_line_makes_the_parsers_raise(line):
    ran("syslog: parsers never raise")
    record = parse_syslog(line)
    assert record is None or isinstance(record, SyslogRecord)
    parser = SshLogParser()
    parser.parse_line(line)
    if record is not None:
        assert isinstance(record.message, str)
        parser.classify(record)
        parser.classify(record)  # a second line of the same process (dropbear's memory)


# Three VMs trusted for addresses, networks and secrets that overlap on purpose.
SECRETS = {"vm-a": "a" * 16 + "-secret", "vm-b": "b-secret-0123456789", "vm-c": "c" * 20}
TRUST_MAP = {
    "vm-a": ["10.0.0.5", f"secret:{SECRETS['vm-a']}"],
    "vm-b": ["10.0.0.0/24", "2001:db8::/64", f"secret:{SECRETS['vm-b']}"],
    "vm-c": ["192.0.2.7", f"secret:{SECRETS['vm-c']}"],
}
TRUST = TrustedSources(TRUST_MAP)
DOMAINS = list(TRUST_MAP)
NETWORKS = {
    d: [ipaddress.ip_network(e, strict=False) for e in entries if not e.startswith("secret:")]
    for d, entries in TRUST_MAP.items()
}
near_secrets = st.one_of(
    st.sampled_from(list(SECRETS.values())),
    st.sampled_from(list(SECRETS.values())).map(lambda s: s[:-1]),
    st.sampled_from(list(SECRETS.values())).map(lambda s: s + "x"),
    st.sampled_from(list(SECRETS.values())).map(str.upper),
    st.sampled_from(list(SECRETS.values())).map(lambda s: s[:5] + '\\"' + s[5:]),
    hostile_text,
)
TRUSTED_PEERS = st.sampled_from(["10.0.0.5", "10.0.0.77", "192.0.2.7", "2001:db8::5"])
peers = st.one_of(
    TRUSTED_PEERS,
    TRUSTED_PEERS,
    st.sampled_from(["10.0.0.5", "10.0.0.6", "10.0.1.5", "192.0.2.7", "127.0.0.1", "::1",
                     "2001:db8::5", "::ffff:10.0.0.5", "10.0.0.5 ", "010.0.0.5", "", "other"]),
    st.none(),
    st.ip_addresses().map(str),
    hostile_text,
)  # fmt: skip
hostnames = st.one_of(st.sampled_from([*DOMAINS, "-", "vm-a.", "VM-A"]), hostile_text)
sd_ids = st.sampled_from(["twarga@32473", "twarga@32474", "twarga", "other@1", "twarga@32473x"])


@st.composite
def structured_data(draw: st.DrawFn) -> str:
    elements = []
    for _ in range(draw(st.integers(0, 3))):
        params = []
        for _ in range(draw(st.integers(0, 3))):
            name = draw(st.sampled_from(["secret", "x", "secret2", "Secret"]))
            value = draw(near_secrets).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
            if draw(st.booleans()):
                value = draw(near_secrets)  # unescaped: whatever a sender writes
            params.append(f' {name}="{value}"')
        elements.append(f"[{draw(sd_ids)}{''.join(params)}]")
    return "".join(elements) or "-"


three_in_four = st.integers(0, 3).map(bool)


@st.composite
def network_lines(draw: st.DrawFn) -> str:
    host = draw(hostnames)
    if draw(three_in_four):
        msg = draw(st.sampled_from([
            "Failed password for root from 203.0.113.9 port 4711 ssh2",
            "Invalid user admin from 203.0.113.9 port 4711",
            "Accepted password for root from 203.0.113.9 port 4711 ssh2",
        ]))  # fmt: skip
        return f"<38>1 2026-12-03T07:00:00Z {host} sshd 42 - {draw(structured_data())} {msg}"
    return draw(hostile_text)


def allowed(domain: str, peer: str | None, record: SyslogRecord) -> bool:
    """Whether trust configured for ``domain`` vouches for this line (the specification,
    written apart from TrustedSources): its secret as a whole quoted value in its own SD-ID,
    or a sender address trusted for it alone (or for it and others, when the hostname is
    its domain)."""
    sd = record.structured_data or ""
    if f'secret="{SECRETS[domain]}"' in sd and "[twarga@32473" in sd:
        return True
    try:
        address = ipaddress.ip_address(peer or "")
    except ValueError:
        return False
    owners = {d for d, nets in NETWORKS.items() if any(address in n for n in nets)}
    return domain in owners and (owners == {domain} or record.hostname == domain)


class NoSoc:
    """The ingest's SOC is only used by its consumer, which these tests do not start."""


@fuzz(15_000)
@given(network_lines(), peers, st.sampled_from(["udp", "tcp", "virtio"]), st.integers(1, 9))
def test_a_line_is_only_attributed_through_the_trust_configured_for_that_vm(
    line, peer, channel, vm_id
):
    ran("syslog: attribution")
    ingest = SyslogIngest(NoSoc(), trust=TRUST, unattributed_rate=1e9, unattributed_burst=1e9)  # type: ignore[arg-type]
    untrusting = SyslogIngest(NoSoc(), unattributed_rate=1e9, unattributed_burst=1e9)  # type: ignore[arg-type]
    origin = Origin(
        channel, vm_id if channel == "virtio" else None, None if channel == "virtio" else peer
    )
    raw = line.encode("utf-8", "surrogatepass")
    record = parse_syslog(raw)
    if record is not None and channel != "virtio":
        domain = TRUST.attribute(peer, record)
        assert domain is None or allowed(domain, peer, record), (domain, peer, record)
        assert TrustedSources().attribute(peer, record) is None
    obs: Any = ingest._observe(origin, raw)
    if obs is None:
        return
    if channel == "virtio":
        # A VM's own channel: that VM, whatever the line claims.
        assert obs.vm_id == vm_id and obs.domain is None
    else:
        assert obs.vm_id is None
        if obs.domain is not None:
            ran("syslog: attribution (a VM vouched for)")
        assert obs.domain is None or allowed(obs.domain, peer, record)  # type: ignore[arg-type]
        assert untrusting._observe(origin, raw).domain is None  # type: ignore[union-attr]


@fuzz(2_500)
@given(st.dictionaries(st.sampled_from(DOMAINS), st.lists(hostile_text, max_size=3), max_size=3))
def test_bad_trust_entries_are_refused_never_half_read(mapping):
    ran("syslog: trust settings")
    try:
        trust = TrustedSources(mapping)
    except ValueError:
        return
    for network, domain in trust.networks:
        assert any(ipaddress.ip_network(e, strict=False) == network
                   for e in mapping[domain] if not e.startswith("secret:"))  # fmt: skip
    for secret, domain in trust.secrets:
        assert f"secret:{secret.decode()}" in mapping[domain]
