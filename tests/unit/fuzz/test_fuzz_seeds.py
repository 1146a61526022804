"""The seed builders under hostile input: the tiny seed's ``network`` file, the segment
address checks, SHA-512 crypt against busybox, and the cloud-init NoCloud documents of
``build_seed_iso`` (user-data, meta-data, network-config): every value either refused or
read back by YAML (what cloud-init reads them with) exactly, with no key of its own."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.fuzz import fuzz, ran
from twarga_lab.errors import ValidationFailed
from twarga_lab.schemas.me import validate_ssh_key
from twarga_lab.virt import images
from twarga_lab.virt.domain import SYSLOG_CHANNEL, USER_NET_MAC
from twarga_lab.virt.images import build_seed_iso, rsyslog_forwarding
from twarga_lab.virt.seed import (
    SEGMENT_BOOTCMD,
    network_file,
    segment_address,
    sha512_crypt,
)

HOSTILE = [
    '"', "'", ": ", "- ", "#", "&a", "*a", "!!python/object:os.system", "{", "}", "[", "]",
    "\n", "\r", "\r\n", "\t", "\x00", "\x1f", "\x7f", "\x85", "\u2028", "\ufeff", "\ufffe",
    "\\", "\\u0041", "%", "@", "`", "|", ">", "---", "...", "<<", "?", ",", "=", " ", "é", "☃",
    "\ud800", "true", "null", "0x1f", "1e3", "~", "key: value", "\nusers: []", '"}, "x": "',
]  # fmt: skip
# Any character but lone surrogates (emoji and the rest beyond U+FFFF included).
CHARS = st.characters()
HOSTILE_CHARS = sorted({c for piece in HOSTILE for c in piece})
hostile_text = st.one_of(
    st.text(CHARS | st.sampled_from(HOSTILE_CHARS), max_size=30),
    st.lists(st.sampled_from(HOSTILE), max_size=8).map("".join),
    st.tuples(st.sampled_from(HOSTILE), st.integers(100, 2000)).map(lambda p: p[0] * p[1]),
)
valid_mac = st.lists(st.integers(0, 255), min_size=3, max_size=3).map(
    lambda b: "52:54:00:" + ":".join(f"{x:02x}" for x in b)
)
macs = st.one_of(valid_mac, valid_mac, hostile_text, st.just(USER_NET_MAC))
valid_address = st.builds(
    lambda ip, prefix: f"{ipaddress.IPv4Address(ip)}/{prefix}",
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
addresses = st.one_of(
    valid_address, valid_address, hostile_text, valid_address.map(lambda a: a + "\n"),
    valid_address.map(lambda a: " " + a), st.integers(0, 2**32 - 1),
)  # fmt: skip
segment_lists = st.lists(st.tuples(macs, addresses), max_size=4)


def checked(segments: list[tuple[object, object]]) -> list[tuple[str, str]] | None:
    """What each (MAC, address) must become: the MAC as given and the address in its
    canonical form; None when a pair may be refused."""
    out = []
    for mac, address in segments:
        if not isinstance(mac, str) or not isinstance(address, str):
            return None
        try:
            iface = ipaddress.IPv4Interface(address)
        except ValueError:
            return None
        out.append((mac, f"{iface.ip}/{iface.network.prefixlen}"))
    return out


@fuzz(8_000)
@given(segment_lists)
def test_the_network_file_is_one_checked_line_per_segment(segments):
    ran("seed: network file")
    try:
        text = network_file(segments)
    except ValueError:
        return
    expected = checked(segments)
    assert expected is not None, "a pair the checks should have refused was written"
    lines = text.split("\n")
    assert lines[-1] == "" and lines[:-1] == [f"{m} {a}" for m, a in expected]
    for line in lines[:-1]:
        mac, address = line.split(" ")
        # Exactly what segment_address accepts: the value cannot carry a second line.
        assert segment_address(mac, address) == (mac, address)
        iface = ipaddress.IPv4Interface(address)
        assert 8 <= iface.network.prefixlen <= 30
        assert iface.ip not in (iface.network.network_address, iface.network.broadcast_address)
    assert len({line.split(" ")[0] for line in lines[:-1]}) == len(lines) - 1


MKPASSWD = shutil.which("busybox")
CRYPT_SALT = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.mark.skipif(MKPASSWD is None, reason="busybox (its mkpasswd) is not installed")
@fuzz(300)
@given(
    password=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                     max_size=80),
    salt=st.text(CRYPT_SALT, min_size=1, max_size=20),
)  # fmt: skip
def test_sha512_crypt_is_what_busybox_mkpasswd_says(password, salt):
    ran("seed: sha512_crypt vs mkpasswd")
    reference = subprocess.run(
        [str(MKPASSWD), "mkpasswd", "-m", "sha512", "-S", salt[:16], "--", password],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert sha512_crypt(password, salt) == reference


def rendered_seed(**kwargs: object) -> dict[str, str]:
    """The documents ``build_seed_iso`` puts on the ISO, taken from genisoimage's command
    line (a stand-in that writes an empty ISO: the real one is in the last test)."""
    seen: dict[str, str] = {}

    def genisoimage(argv: list[str], **_: object) -> subprocess.CompletedProcess[bytes]:
        for arg in argv:
            if Path(arg).name in ("user-data", "meta-data", "network-config"):
                seen[Path(arg).name] = Path(arg).read_text()
        Path(argv[argv.index("-output") + 1]).write_bytes(b"")
        return subprocess.CompletedProcess(argv, 0, b"", b"")

    with mock.patch.object(images.subprocess, "run", genisoimage):
        build_seed_iso(**kwargs)  # type: ignore[arg-type]
    return seen


def expected_user_data(hostname, keys, user, password_hash, channel, segments):  # type: ignore[no-untyped-def]
    account: dict[str, object] = {
        "name": user, "sudo": "ALL=(ALL) NOPASSWD:ALL", "shell": "/bin/bash",
    }  # fmt: skip
    if keys:
        account["ssh_authorized_keys"] = keys
    if password_hash:
        account.update(passwd=password_hash, lock_passwd=False)
    data: dict[str, object] = {
        "hostname": hostname, "users": [account], "ssh_pwauth": bool(password_hash)
    }  # fmt: skip
    if segments:
        words = [v for pair in segments for v in pair]
        data["bootcmd"] = [["sh", "-c", SEGMENT_BOOTCMD, "twarga-segments", *words]]
    if channel:
        data["write_files"] = [{
            "path": "/etc/rsyslog.d/10-twarga-soc.conf", "permissions": "0644",
            "content": rsyslog_forwarding(channel),
        }]  # fmt: skip
        data["runcmd"] = [["systemctl", "restart", "rsyslog"]]
    return data


seed_args = {
    "instance_id": hostile_text,
    "hostname": hostile_text,
    "ssh_keys": st.lists(hostile_text, max_size=3),
    "user": hostile_text,
    "password_hash": st.none() | hostile_text,
    "syslog_channel": st.sampled_from([None, SYSLOG_CHANNEL, "org.twarga.other-1"]),
    "segments": st.lists(st.tuples(valid_mac, valid_address), max_size=3),
}


SCRATCH = Path(tempfile.mkdtemp(prefix="twarga-fuzz-seed-"))


@fuzz(3_000)
@given(**seed_args)
def test_cloud_init_documents_read_back_exactly_with_no_key_of_their_own(
    instance_id, hostname, ssh_keys, user, password_hash, syslog_channel, segments
):
    ran("seed: cloud-init documents")
    values = {
        "instance_id": instance_id, "hostname": hostname, "ssh_keys": ssh_keys, "user": user,
        "password_hash": password_hash, "syslog_channel": syslog_channel, "segments": segments,
    }  # fmt: skip
    expected_segments = checked(segments)
    try:
        docs = rendered_seed(dest=SCRATCH / "seed.iso", **values)
    except ValueError:
        return  # a segment refused (network/broadcast address, prefix, MAC twice)
    assert expected_segments is not None
    assert docs["user-data"].startswith("#cloud-config\n")
    user_data = yaml.safe_load(docs["user-data"])
    assert user_data == expected_user_data(
        values["hostname"], values["ssh_keys"], values["user"], values["password_hash"],
        values["syslog_channel"], expected_segments,
    )  # fmt: skip
    assert yaml.safe_load(docs["meta-data"]) == {
        "instance-id": values["instance_id"], "local-hostname": values["hostname"],
    }  # fmt: skip
    if not segments:
        assert "network-config" not in docs
        return
    config = yaml.safe_load(docs["network-config"])
    ethernets = {"usernet": {"match": {"macaddress": USER_NET_MAC}, "dhcp4": True}}
    for i, (mac, address) in enumerate(expected_segments):
        ethernets[f"twargaseg{i}"] = {
            "match": {"macaddress": mac}, "dhcp4": False, "dhcp6": False,
            "addresses": [address],
        }  # fmt: skip
    assert config == {"version": 2, "ethernets": ethernets}


@fuzz(12_000)
@given(st.one_of(hostile_text, st.lists(st.sampled_from([*HOSTILE, "ssh-ed25519 ", "AAAA"]),
                                        max_size=8).map("".join)))  # fmt: skip
def test_an_accepted_ssh_key_is_one_line(key):
    # The gate in front of both seeds: a key with a line break would be two lines of
    # authorized_keys (build_tiny_seed writes each key as one line and trusts its caller).
    ran("seed: ssh key gate")
    try:
        accepted = validate_ssh_key(key)
    except ValidationFailed:
        return
    if accepted is not None:
        assert len(accepted.splitlines()) == 1 and accepted == accepted.strip()
        assert accepted.split(" ")[0] in ("ssh-ed25519", "ssh-rsa") or accepted.startswith(
            ("ecdsa-sha2-", "sk-ssh-ed25519@")
        )


def test_a_key_comment_with_an_emoji_reads_back_in_cloud_init(tmp_path):
    # Found by the property above: json.dumps wrote the emoji as a surrogate pair, which
    # PyYAML (cloud-init's reader) read as two lone surrogates.
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ5 alice@😀"
    docs = rendered_seed(dest=tmp_path / "seed.iso", instance_id="i", hostname="h",
                         ssh_keys=[validate_ssh_key(key)])  # fmt: skip
    assert yaml.safe_load(docs["user-data"])["users"][0]["ssh_authorized_keys"] == [key]


@pytest.mark.skipif(shutil.which("isoinfo") is None, reason="isoinfo is not installed")
def test_one_real_iso_holds_the_same_hostile_documents(tmp_path):
    values = {
        "instance_id": 'i"\n}, "x": "y', "hostname": "h: x\n- y\u2028#z",
        "ssh_keys": ["ssh-ed25519 AAAA a\"b'c"], "user": "twarga\n  sudo: ALL",
        "password_hash": "$6$s$h\"}\x00", "syslog_channel": SYSLOG_CHANNEL,
        "segments": [("52:54:00:0a:00:02", "10.77.0.11/24")],
    }  # fmt: skip
    iso = build_seed_iso(tmp_path / "seed.iso", **values)  # type: ignore[arg-type]
    expected = rendered_seed(dest=tmp_path / "other.iso", **values)
    for name in ("user-data", "meta-data", "network-config"):
        text = subprocess.run(
            ["isoinfo", "-R", "-i", str(iso), "-x", f"/{name}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert text == expected[name]
    user_data = yaml.safe_load(expected["user-data"])
    assert user_data["hostname"] == values["hostname"]
    assert user_data["users"][0]["name"] == values["user"]
    assert user_data["users"][0]["passwd"] == values["password_hash"]
