"""The per-VM seed of the tiny image: root's SSH keys and password hash on a small disk.

The kernel command line is short, visible in ``/proc/cmdline`` and in the domain XML, so
secrets never go there. Instead each VM gets a read-only ISO 9660 disk (``vdb``) holding:

``twarga-seed``
    a marker, so /init only trusts a disk Twarga made;
``authorized_keys``
    the owner's OpenSSH public key(s), installed as ``/root/.ssh/authorized_keys``;
``root-password.hash``
    root's password as a SHA-512 crypt hash (``$6$salt$...``); the password itself is not
    on the disk;
``dropbear_ed25519_host_key``
    the guest's SSH host key, made on the host so its public half can be published to the
    owner (who then knows which server a port really leads to);
``network``
    one line ``MAC ADDRESS/PREFIX`` per lab segment NIC (``52:54:00:0a:4d:0b
    10.77.0.11/24``): /init gives the interface with that MAC that address (no gateway).

The seed file is readable by root only; libvirt hands it to QEMU's user when the VM starts.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from twarga_lab.errors import BackendError
from twarga_lab.virt.domain import USER_NET_MAC

SEED_LABEL = "TWARGASEED"
MARKER_FILE = "twarga-seed"
HOST_KEY_FILE = "dropbear_ed25519_host_key"
NETWORK_FILE = "network"
_MAC_RE = re.compile(r"52:54:00(:[0-9a-f]{2}){3}")
_CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# The byte order of SHA-512 crypt's final encoding (Drepper's specification).
_SHA512_ORDER = (
    (0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26),
    (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32),
    (12, 33, 54), (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38),
    (18, 39, 60), (40, 61, 19), (62, 20, 41),
)  # fmt: skip


def generate_password() -> str:
    """A random root password: 20 characters from a URL-safe alphabet (~120 bits)."""
    return secrets.token_urlsafe(15)


def _encode(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_CRYPT_ALPHABET[value & 0x3F])
        value >>= 6
    return "".join(out)


def sha512_crypt(password: str, salt: str | None = None) -> str:
    """The glibc/libxcrypt ``$6$`` hash of ``password`` (5000 rounds), as /etc/passwd has it.

    Pure Python (the ``crypt`` module is deprecated); checked against busybox ``mkpasswd``
    in the tests.
    """
    salt = salt if salt is not None else "".join(secrets.choice(_CRYPT_ALPHABET) for _ in range(16))
    p, s = password.encode(), salt.encode()[:16]
    b = hashlib.sha512(p + s + p).digest()
    a = hashlib.sha512(p + s)
    a.update((b * (len(p) // 64 + 1))[: len(p)])
    length = len(p)
    while length:
        a.update(b if length & 1 else p)
        length >>= 1
    a_digest = a.digest()
    dp = hashlib.sha512(p * len(p)).digest()
    p_bytes = (dp * (len(p) // 64 + 1))[: len(p)]
    ds = hashlib.sha512(s * (16 + a_digest[0])).digest()
    s_bytes = (ds * (len(s) // 64 + 1))[: len(s)]
    c = a_digest
    for i in range(5000):
        h = hashlib.sha512(p_bytes if i & 1 else c)
        if i % 3:
            h.update(s_bytes)
        if i % 7:
            h.update(p_bytes)
        h.update(c if i & 1 else p_bytes)
        c = h.digest()
    encoded = "".join(_encode((c[x] << 16) | (c[y] << 8) | c[z], 4) for x, y, z in _SHA512_ORDER)
    encoded += _encode(c[63], 2)
    return f"$6${s.decode()}${encoded}"


def generate_host_key(dest: Path) -> str:
    """A new dropbear ed25519 host key in ``dest`` (mode 0600); returns its public half as
    an OpenSSH line (``ssh-ed25519 AAAA...``)."""
    tool = shutil.which("dropbearkey")
    if tool is None:
        raise BackendError("dropbearkey is missing: install Debian's dropbear-bin")
    dest.unlink(missing_ok=True)
    try:
        subprocess.run([tool, "-t", "ed25519", "-f", str(dest)], check=True, capture_output=True,
                       timeout=60)  # fmt: skip
        dest.chmod(0o600)
        shown = subprocess.run([tool, "-y", "-f", str(dest)], check=True, capture_output=True,
                               text=True, timeout=60)  # fmt: skip
    except subprocess.CalledProcessError as e:
        raise BackendError(f"dropbearkey failed: {e.stderr!r}") from e
    for line in shown.stdout.splitlines():
        if line.startswith("ssh-ed25519 "):
            kind, blob = line.split()[:2]
            return f"{kind} {blob}"
    raise BackendError(f"dropbearkey printed no public key: {shown.stdout!r}")


def key_fingerprint(public_key: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key line."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def segment_address(mac: str, address: str) -> tuple[str, str]:
    """``(mac, "A.B.C.D/PREFIX")`` checked: a ``52:54:00:xx:xx:xx`` MAC (lower case) and a
    host address of an IPv4 network (/8../30), not its network or broadcast address."""
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac) or mac == USER_NET_MAC:
        raise ValueError(f"bad segment MAC address {mac!r}")
    try:
        iface = ipaddress.IPv4Interface(address)
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError) as e:
        raise ValueError(f"bad segment address {address!r}") from e
    if "/" not in str(address) or not 8 <= iface.network.prefixlen <= 30:
        raise ValueError(f"bad segment address {address!r}: A.B.C.D/8..30")
    if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
        raise ValueError(f"{address!r} is its network's network or broadcast address")
    return mac, f"{iface.ip}/{iface.network.prefixlen}"


def network_lines(segments: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``segments`` with every MAC and address checked (:func:`segment_address`), no MAC
    twice."""
    lines = [segment_address(mac, address) for mac, address in segments]
    if len({mac for mac, _ in lines}) != len(lines):
        raise ValueError("two segment NICs share a MAC address")
    return lines


def network_file(segments: Sequence[tuple[str, str]]) -> str:
    """The seed's ``network`` file: ``MAC ADDRESS/PREFIX`` lines, each value checked."""
    return "".join(f"{mac} {address}\n" for mac, address in network_lines(segments))


#: Gives each lab segment NIC (found by its MAC) its address in a cloud-init guest:
#: ``sh -c SCRIPT NAME MAC ADDRESS [MAC ADDRESS ...]``, at every boot.
SEGMENT_BOOTCMD = r"""
while [ "$#" -ge 2 ]; do
    mac="$1"; addr="$2"; shift 2
    for dev in /sys/class/net/*; do
        [ "$(cat "$dev/address" 2>/dev/null)" = "$mac" ] || continue
        ip link set dev "${dev##*/}" up
        ip addr replace "$addr" dev "${dev##*/}"
    done
done
"""


def cloud_network_config(segments: Sequence[tuple[str, str]]) -> dict[str, object]:
    """cloud-init network-config v2: DHCP on the user-network NIC (by its MAC), each
    segment NIC (by its MAC) its static address, no gateway."""
    ethernets: dict[str, object] = {
        "usernet": {"match": {"macaddress": USER_NET_MAC}, "dhcp4": True}
    }
    for index, (mac, address) in enumerate(network_lines(segments)):
        ethernets[f"twargaseg{index}"] = {
            "match": {"macaddress": mac},
            "dhcp4": False,
            "dhcp6": False,
            "addresses": [address],
        }
    return {"version": 2, "ethernets": ethernets}


def cloud_segment_bootcmd(segments: Sequence[tuple[str, str]]) -> list[list[str]]:
    """cloud-init ``bootcmd`` setting the segment addresses at every boot, for images whose
    cloud.cfg turns cloud-init's network step off. The checked values are the script's
    arguments, never spliced into its text."""
    words = [value for pair in network_lines(segments) for value in pair]
    return [["sh", "-c", SEGMENT_BOOTCMD, "twarga-segments", *words]]


def build_tiny_seed(
    dest: Path,
    *,
    authorized_keys: list[str],
    root_password_hash: str | None,
    host_key: Path | None = None,
    segments: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write the seed ISO for a tiny-image VM to ``dest`` (mode 0600, replaced atomically).

    ``segments`` are ``(mac, "ADDRESS/PREFIX")`` pairs, one per lab segment NIC."""
    network = network_file(segments) if segments else None
    tool = shutil.which("genisoimage") or shutil.which("mkisofs")
    if tool is None:
        raise BackendError("genisoimage is missing: install Debian's genisoimage")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="twarga-seed-") as tmp:
        staging = Path(tmp) / "seed"
        staging.mkdir(mode=0o700)
        (staging / MARKER_FILE).write_text("1\n")
        keys = [k.strip() for k in authorized_keys if k and k.strip()]
        if keys:
            (staging / "authorized_keys").write_text("".join(f"{k}\n" for k in keys))
        if root_password_hash:
            (staging / "root-password.hash").write_text(root_password_hash + "\n")
        if host_key is not None:
            shutil.copyfile(host_key, staging / HOST_KEY_FILE)
        if network is not None:
            (staging / NETWORK_FILE).write_text(network)
        partial = dest.with_name(f".{dest.name}.tmp")
        try:
            subprocess.run(
                [tool, "-quiet", "-output", str(partial), "-volid", SEED_LABEL,
                 "-rational-rock", "-input-charset", "utf-8", str(staging)],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        except subprocess.CalledProcessError as e:
            partial.unlink(missing_ok=True)
            raise BackendError(f"genisoimage failed: {e.stderr.decode(errors='replace')}") from e
        partial.chmod(0o600)
        os.replace(partial, dest)
    return dest
