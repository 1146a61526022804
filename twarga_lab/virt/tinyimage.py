"""Build the default guest image ``twarga/tiny``.

The image is Debian's cloud kernel plus a small busybox initramfs, booted with direct kernel
boot (``-kernel``/``-initrd``). It needs no disk and boots in a few seconds even without KVM.

What the guest does is driven by the kernel command line:

``twarga.name=NAME``
    hostname (``^[a-z][a-z0-9-]{0,62}$``; anything else falls back to ``twarga``), and the
    serial banner ``Twarga Lab VM NAME is up``.
``twarga.probe=1``
    print ``TWARGA-PROBE-OK`` after the banner and power off (used to test the accelerator).
``twarga.ssh=1``
    start dropbear on port 22 (needs an image built ``with_dropbear``).
``twarga.syslog=HOST:PORT``
    forward syslog over UDP (under QEMU user networking the host's loopback is 10.0.2.2).

A seed ``network`` file (``MAC ADDRESS/PREFIX`` lines) gives lab segment NICs their
addresses; a virtio-serial port ``org.twarga.control.0`` feeds ``twarga-guard``, which
bans (``ip rule ... prohibit``) the addresses the host names. ``dbclient`` (dropbear's
client) lets one lab VM SSH to another (``DROPBEAR_PASSWORD=... dbclient -y``).

Secrets never travel on the command line (readable in ``/proc/cmdline`` and the domain XML):
a per-VM seed, an ISO 9660 disk with a ``twarga-seed`` marker (``twarga_lab.virt.seed``), is
mounted read-only at boot; its ``authorized_keys`` becomes root's and its
``root-password.hash`` (a SHA-512 crypt hash) root's password.

When the domain has a virtio-serial port named ``org.twarga.syslog.0``, syslogd writes every
line into it: the host end is a UNIX socket per VM, so the service knows which VM spoke.

Everything is built with the standard library plus ``cpio`` (package ``cpio``) and, for
dropbear, ``ldd`` (package ``libc-bin``).

Why it is long: the guest's init script and busybox layout are data of the build and
change with it; splitting them would hide what the image does.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GUARD_SCRIPT",
    "IMAGE_NAME",
    "INIT_SCRIPT",
    "MODULE_LOAD_ORDER",
    "ImageBuildError",
    "TinyImageFiles",
    "build_tiny_image",
    "find_cloud_kernel",
    "load_tiny_image",
    "read_kernel_version",
]

log = logging.getLogger(__name__)

IMAGE_NAME = "twarga/tiny"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
MANIFEST_FILE = "tinyimage.json"  # not image.json: that is the image store's metadata

KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
DROPBEAR_PACKAGE = "dropbear-bin"
CPIO_PACKAGE = "cpio"
LDD_PACKAGE = "libc-bin"

#: Modules loaded by /init, in this order. Their dependencies (from ``modules.dep``) are put
#: first; modules that are built in or absent are skipped. ``virtio_rng`` and ``virtio_balloon``
#: serve libvirt's rng and memballoon devices; ``evdev`` and ``button`` make the ACPI power
#: button reach busybox ``acpid`` (graceful shutdown from libvirt).
MODULE_LOAD_ORDER: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "isofs",
    "virtio_console",
    "virtio_rng",
    "virtio_balloon",
    "evdev",
    "button",
)

_KERNEL_GLOB = "vmlinuz-*-cloud-amd64"
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")

#: PID 1 of the guest. A constant: nothing from the user is ever written into it; values from
#: the kernel command line are validated by the script before use.
INIT_SCRIPT = r"""#!/bin/sh
# /init of the Twarga Lab tiny image (PID 1), written by twarga_lab.virt.tinyimage.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
umask 022
set -f

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mkdir -p /run/udhcpc

CONSOLE=/dev/console
[ -c /dev/ttyS0 ] && CONSOLE=/dev/ttyS0
exec </dev/null >"$CONSOLE" 2>&1
# Keep kernel chatter off the serial shell; it still goes to syslog through klogd.
dmesg -n 1

name=twarga
probe=0
ssh=0
syslog=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        twarga.name=*) name="${arg#twarga.name=}" ;;
        twarga.probe=1) probe=1 ;;
        twarga.ssh=1) ssh=1 ;;
        twarga.syslog=*) syslog="${arg#twarga.syslog=}" ;;
    esac
done
printf '%s\n' "$name" | grep -Eqx '[a-z][a-z0-9-]{0,62}' || name=twarga
printf '%s\n' "$syslog" | grep -Eqx '[A-Za-z0-9.:-]+' || syslog=

# A dotted IPv4 address, each part 0..255 without leading zeros.
twarga_is_ipv4() {
    printf '%s\n' "$1" | grep -Eqx \
        '(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}'
}

hostname "$name"
printf '%s\n' "$name" >/etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$name" >/etc/hosts

while read -r mod; do
    [ -n "$mod" ] && insmod "$mod" 2>/dev/null
done </etc/twarga/modules

# Virtio disks and serial ports finish probing after insmod returns: wait (10 s at most)
# until every disk has its block device and every serial device a named port.
set +f  # globs below only name sysfs and /dev entries
tries=0
while [ "$tries" -lt 100 ]; do
    pending=0
    for dev in /sys/bus/virtio/devices/*; do
        [ -r "$dev/device" ] || continue
        case "$(cat "$dev/device")" in
            0x0002) [ -d "$dev/block" ] || pending=1 ;;
            0x0003) ls "$dev"/virtio-ports/*/name >/dev/null 2>&1 || pending=1 ;;
        esac
    done
    [ "$pending" = 0 ] && break
    usleep 100000
    tries=$((tries + 1))
done

# The host reads this port's UNIX socket: it tells the service which VM is speaking.
syslog_port=
for port in /sys/class/virtio-ports/*; do
    [ -r "$port/name" ] && [ "$(cat "$port/name")" = org.twarga.syslog.0 ] &&
        syslog_port="/dev/${port##*/}"
done
if [ -n "$syslog_port" ] && [ -n "$syslog" ]; then
    syslogd -O "$syslog_port" -L -R "$syslog"
elif [ -n "$syslog_port" ]; then
    syslogd -O "$syslog_port"
elif [ -n "$syslog" ]; then
    syslogd -C256 -L -R "$syslog"
else
    syslogd -C256
fi
klogd

# The per-VM seed (read-only ISO 9660 disk): root's authorized_keys and password hash.
mkdir -p /run/seed
for disk in /dev/vd[b-z]; do
    [ -b "$disk" ] || continue
    mount -t iso9660 -o ro,nosuid,nodev,noexec "$disk" /run/seed 2>/dev/null || continue
    if [ -f /run/seed/twarga-seed ]; then
        if [ -f /run/seed/authorized_keys ]; then
            mkdir -p /root/.ssh
            chmod 700 /root /root/.ssh
            cp /run/seed/authorized_keys /root/.ssh/authorized_keys
            chmod 600 /root/.ssh/authorized_keys
        fi
        hash=$(head -n 1 /run/seed/root-password.hash 2>/dev/null)
        # Only a SHA-512 crypt hash: its alphabet cannot break out of the sed expression.
        if printf '%s\n' "$hash" | grep -Eqx '\$6\$[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{86}'; then
            sed -i "s|^root:[^:]*:|root:$hash:|" /etc/passwd
        fi
        unset hash
        # Lab segment NICs ("MAC ADDRESS/PREFIX" lines), applied once the NICs are up.
        [ -f /run/seed/network ] && cp /run/seed/network /run/twarga-network
        # The host key the service made (and publishes to the owner): dropbear uses it.
        if [ -f /run/seed/dropbear_ed25519_host_key ]; then
            mkdir -p /etc/dropbear
            cp /run/seed/dropbear_ed25519_host_key /etc/dropbear/dropbear_ed25519_host_key
            chmod 600 /etc/dropbear/dropbear_ed25519_host_key
        fi
        umount /run/seed
        break
    fi
    umount /run/seed
done
set -f

ifconfig lo 127.0.0.1 netmask 255.0.0.0 up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    udhcpc -i eth0 -q -n -t 5 -S -s /usr/share/udhcpc/default.script >/dev/null 2>&1 &
fi

# Lab segments: each seed line gives the interface with that MAC its address (no gateway).
# Every value is checked before use; a line that does not fit is skipped.
if [ -f /run/twarga-network ]; then
    while read -r mac addr rest; do
        [ -z "$rest" ] || continue
        printf '%s\n' "$mac" | grep -Eqx '52:54:00(:[0-9a-f]{2}){3}' || continue
        twarga_is_ipv4 "${addr%/*}" || continue
        printf '%s\n' "${addr#*/}" | grep -Eqx '[89]|[12][0-9]|30' || continue
        set +f
        for dev in /sys/class/net/*; do
            [ "$(cat "$dev/address" 2>/dev/null)" = "$mac" ] || continue
            ifname="${dev##*/}"
            ip link set "$ifname" up && ip addr add "$addr" dev "$ifname" &&
                echo "twarga: $ifname $mac $addr"
            # A banned peer's packets (twarga-guard) are refused with an ICMP "prohibited",
            # which only a forwarding interface sends: TCP then fails at once instead of
            # timing out. Nothing is forwarded for real: what the segment sends that is not
            # for this guest is dropped.
            ip rule add pref 200 iif "$ifname" type blackhole &&
                echo 1 >"/proc/sys/net/ipv4/conf/$ifname/forwarding"
        done
        set -f
    done </run/twarga-network
fi

# The host pushes ban/unban lines into this port; twarga-guard applies them.
control_port=
set +f
for port in /sys/class/virtio-ports/*; do
    [ -r "$port/name" ] && [ "$(cat "$port/name")" = org.twarga.control.0 ] &&
        control_port="/dev/${port##*/}"
done
set -f
if [ -n "$control_port" ] && [ -c "$control_port" ]; then
    setsid /usr/sbin/twarga-guard "$control_port" </dev/null >/dev/null 2>&1 &
fi

# Graceful shutdown: the ACPI power button (button + evdev modules) runs
# /etc/acpi/PWRF/00000080, which powers off.
acpid -c /etc/acpi -l /dev/null

if [ "$ssh" = 1 ] && [ -x /usr/sbin/dropbear ]; then
    if [ -f /etc/dropbear/dropbear_ed25519_host_key ]; then
        dropbear -r /etc/dropbear/dropbear_ed25519_host_key -p 22
    else
        dropbear -R -p 22
    fi
fi

# The banner starts on a line of its own even if firmware left the cursor mid-line.
echo
echo "Twarga Lab VM $name is up"

if [ "$probe" = 1 ]; then
    echo TWARGA-PROBE-OK
    sync
    poweroff -f
fi

cd /root
while :; do
    setsid -c sh -l <"$CONSOLE" >"$CONSOLE" 2>&1
    sleep 1
done
"""

#: The control-port loop (``/usr/sbin/twarga-guard PORT``), started by /init when the
#: domain has the virtio-serial port ``org.twarga.control.0``. The host writes
#: ``ban ADDR`` / ``unban ADDR`` lines (``virt.guest_control``); a banned address is refused
#: by a ``prohibit`` policy rule (everything from it: TCP gets "no route to host" at once),
#: and each change is logged to syslog, which the host reads on the syslog channel, and
#: acknowledged on the port itself (``ok ban ADDR``).
GUARD_SCRIPT = r"""#!/bin/sh
# twarga-guard of the Twarga Lab tiny image, written by twarga_lab.virt.tinyimage.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
set -f
port="$1"
[ -c "$port" ] || exit 1
is_ipv4() {
    printf '%s\n' "$1" | grep -Eqx \
        '(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}'
}
# The kernel's "local" rule (priority 0) would deliver a banned peer's packets before any
# other rule is read: move it to 100, so the ban rules (priority 10) come first.
if ip rule add pref 100 table local; then
    ip rule del pref 0 table local
fi
while :; do
    # A read returns EOF at once while the host end is closed: wait a little, open again.
    # The port opens once only: read and answer on the same descriptor.
    while read -r verb addr rest <&3; do
        [ -z "$rest" ] || continue
        is_ipv4 "$addr" || continue
        case "$verb" in
            ban)
                # At most one rule per address: a second ban replaces the first.
                while ip rule del from "$addr" type prohibit 2>/dev/null; do :; done
                ip rule add pref 10 from "$addr" type prohibit || continue
                logger -t twarga-guard -p auth.notice "banned $addr"
                ;;
            unban)
                while ip rule del from "$addr" type prohibit 2>/dev/null; do :; done
                logger -t twarga-guard -p auth.notice "unbanned $addr"
                ;;
            *) continue ;;
        esac
        printf 'ok %s %s\n' "$verb" "$addr" >&3
    done 3<>"$port"
    usleep 200000
done
"""

_UDHCPC_SCRIPT = r"""#!/bin/sh
# Minimal udhcpc hook of the Twarga Lab tiny image.
[ -n "$interface" ] || exit 1
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
        if [ -n "$router" ]; then
            ip route del default dev "$interface" 2>/dev/null
            for gw in $router; do
                ip route add default via "$gw" dev "$interface" && break
            done
        fi
        : >/etc/resolv.conf
        [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
        for ns in $dns; do
            echo "nameserver $ns" >>/etc/resolv.conf
        done
        ;;
esac
exit 0
"""

_ACPI_POWER_SCRIPT = """#!/bin/sh
# Power button pressed (libvirt "shutdown" with the ACPI mode): power off now.
logger -t acpid "power button: powering off"
sync
poweroff -f
"""

_PROFILE = r"""export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
export TERM="${TERM:-vt100}"
export PS1='\u@\h:\w\$ '
[ "$(pwd)" = / ] && cd "$HOME"
"""

_PASSWD = "root:*:0:0:root:/root:/bin/sh\n"
_GROUP = "root:x:0:\ntty:x:5:\n"
_SHELLS = "/bin/sh\n/bin/ash\n"
_NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
_ACPID_CONF = "PWRF PWRF/00000080\n"


class ImageBuildError(RuntimeError):
    """An input of the tiny image is missing or unusable.

    ``package`` names the Debian package that provides it, when there is one.
    """

    def __init__(self, message: str, package: str | None = None) -> None:
        super().__init__(message)
        self.package = package


@dataclass(frozen=True)
class TinyImageFiles:
    """The files of a built tiny image."""

    kernel: Path
    """Copy of ``/boot/vmlinuz-<ver>-cloud-amd64``."""
    initrd: Path
    """Our gzip'd newc cpio initramfs."""
    kernel_version: str
    """Release of the kernel, e.g. ``6.1.0-56-cloud-amd64``."""


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def find_cloud_kernel(boot_dir: Path = Path("/boot")) -> tuple[Path, str]:
    """Return the newest ``vmlinuz-*-cloud-amd64`` in ``boot_dir`` and its version.

    Raises ImageBuildError naming ``linux-image-cloud-amd64`` when there is none.
    """
    candidates: list[tuple[tuple[int, ...], Path, str]] = []
    for path in Path(boot_dir).glob(_KERNEL_GLOB):
        if not path.is_file():
            continue
        version = path.name.removeprefix("vmlinuz-")
        candidates.append((_version_key(version), path, version))
    if not candidates:
        raise ImageBuildError(
            f"no Debian cloud kernel ({_KERNEL_GLOB}) in {boot_dir}: "
            f"install the Debian package {KERNEL_PACKAGE}",
            package=KERNEL_PACKAGE,
        )
    _, path, version = max(candidates)
    return path, version


def read_kernel_version(kernel: Path) -> str | None:
    """Read the release string from an x86 bzImage header (boot protocol >= 2.00).

    Returns e.g. ``6.1.0-56-cloud-amd64``, or None if the file is not a bzImage.
    """
    try:
        with open(kernel, "rb") as f:
            header = f.read(0x400)
            if len(header) < 0x210 or header[0x202:0x206] != b"HdrS":
                return None
            offset = int.from_bytes(header[0x20E:0x210], "little")
            if offset == 0:
                return None
            f.seek(offset + 0x200)
            raw = f.read(256)
    except OSError:
        return None
    text = raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()
    return text.split()[0] if text else None


def recipe_digest() -> str:
    """A digest of this module, which is the image's whole recipe (``/init`` included): an
    image built by another version of it is rebuilt, not booted with an outdated init."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def load_tiny_image(dest_dir: Path) -> TinyImageFiles | None:
    """Return the image previously built into ``dest_dir``, or None if it is absent/partial.

    The manifest is written last by :func:`build_tiny_image`, so an interrupted build is
    never taken for a valid image.
    """
    dest_dir = Path(dest_dir)
    try:
        manifest = json.loads((dest_dir / MANIFEST_FILE).read_text())
        kernel = dest_dir / str(manifest["kernel"])
        initrd = dest_dir / str(manifest["initrd"])
        version = str(manifest["kernel_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if manifest.get("name") != IMAGE_NAME or not kernel.is_file() or not initrd.is_file():
        return None
    if manifest.get("recipe") != recipe_digest():
        return None  # built by an older recipe
    return TinyImageFiles(kernel=kernel, initrd=initrd, kernel_version=version)


def build_tiny_image(
    dest_dir: Path,
    *,
    busybox: Path = Path("/bin/busybox"),
    boot_dir: Path = Path("/boot"),
    modules_root: Path = Path("/lib/modules"),
    with_dropbear: bool = True,
) -> TinyImageFiles:
    """Build ``twarga/tiny`` into ``dest_dir`` (``vmlinuz``, ``initrd.img``, ``tinyimage.json``).

    Every file is written to a temporary name and renamed into place; the manifest goes
    last, so :func:`load_tiny_image` only sees complete images.

    Raises ImageBuildError, naming the Debian package, when an input is missing.
    """
    dest_dir = Path(dest_dir)
    busybox = Path(busybox)
    _check_static_elf(busybox)
    kernel_src, version = find_cloud_kernel(Path(boot_dir))
    modules_dir = Path(modules_root) / version
    if not (modules_dir / "modules.dep").is_file():
        raise ImageBuildError(
            f"kernel modules for {version} are missing ({modules_dir}/modules.dep): "
            f"reinstall the Debian package linux-image-{version} ({KERNEL_PACKAGE})",
            package=KERNEL_PACKAGE,
        )
    cpio = shutil.which("cpio")
    if cpio is None:
        raise ImageBuildError(
            "cpio is not installed: install the Debian package cpio", package=CPIO_PACKAGE
        )
    dropbear = Path("/usr/sbin/dropbear")
    dbclient = Path("/usr/bin/dbclient")  # dropbear's client: one lab VM SSHes to another
    for program in (dropbear, dbclient) if with_dropbear else ():
        if not program.is_file():
            raise ImageBuildError(
                f"{program} is missing: install the Debian package {DROPBEAR_PACKAGE}",
                package=DROPBEAR_PACKAGE,
            )

    dest_dir.mkdir(parents=True, exist_ok=True)
    # An old manifest must not vouch for files that are about to be replaced.
    with contextlib.suppress(FileNotFoundError):
        (dest_dir / MANIFEST_FILE).unlink()

    with tempfile.TemporaryDirectory(prefix="twarga-tiny-") as tmp:
        root = Path(tmp) / "root"
        _populate_root(root, busybox=busybox, modules_dir=modules_dir, version=version)
        if with_dropbear:
            _install_dropbear(root, dropbear)
            _install_dropbear(root, dbclient)
        archive = _pack_cpio(root, cpio)

    kernel = dest_dir / KERNEL_FILE
    initrd = dest_dir / INITRD_FILE
    with open(kernel_src, "rb") as src:
        _write_atomic(kernel, src.read(), mode=0o644)
    _write_atomic(initrd, gzip.compress(archive, compresslevel=9, mtime=0), mode=0o644)
    manifest = {
        "name": IMAGE_NAME,
        "kernel": KERNEL_FILE,
        "initrd": INITRD_FILE,
        "kernel_version": version,
        "with_dropbear": with_dropbear,
        "recipe": recipe_digest(),
    }
    _write_atomic(
        dest_dir / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode(), mode=0o644
    )
    log.info("built %s for kernel %s in %s", IMAGE_NAME, version, dest_dir)
    return TinyImageFiles(kernel=kernel, initrd=initrd, kernel_version=version)


# --- building blocks ------------------------------------------------------------------------


def _check_static_elf(busybox: Path) -> None:
    """Check that ``busybox`` exists and is a static ELF (no PT_INTERP)."""
    missing = ImageBuildError(
        f"{busybox} is missing: install the Debian package {BUSYBOX_PACKAGE}",
        package=BUSYBOX_PACKAGE,
    )
    try:
        with open(busybox, "rb") as f:
            header = f.read(64)
            if header[:4] != b"\x7fELF" or header[4] != 2:  # ELF64
                raise ImageBuildError(
                    f"{busybox} is not a 64-bit ELF program: install {BUSYBOX_PACKAGE}",
                    package=BUSYBOX_PACKAGE,
                )
            order = "little" if header[5] == 1 else "big"
            phoff = int.from_bytes(header[0x20:0x28], order)
            phentsize = int.from_bytes(header[0x36:0x38], order)
            phnum = int.from_bytes(header[0x38:0x3A], order)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except FileNotFoundError:
        raise missing from None
    except IsADirectoryError:
        raise missing from None
    pt_interp = 3
    for i in range(phnum):
        entry = table[i * phentsize : i * phentsize + 4]
        if int.from_bytes(entry, order) == pt_interp:
            raise ImageBuildError(
                f"{busybox} is dynamically linked; the initramfs needs the static build: "
                f"install the Debian package {BUSYBOX_PACKAGE}",
                package=BUSYBOX_PACKAGE,
            )


def _write_text(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _populate_root(root: Path, *, busybox: Path, modules_dir: Path, version: str) -> None:
    for d in (
        "bin", "sbin", "usr/bin", "usr/sbin", "lib", "etc/twarga", "etc/dropbear",
        "etc/acpi/PWRF", "usr/share/udhcpc", "etc/udhcpc", "proc", "sys", "dev", "run",
        "tmp", "var/log", "mnt",
    ):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "root").mkdir(mode=0o700)
    (root / "var/run").symlink_to("../run")
    with contextlib.suppress(PermissionError):  # without root the kernel's own warning is fine
        os.mknod(root / "dev/console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))

    shutil.copyfile(busybox, root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    _install_applets(root, busybox)

    _write_text(root / "init", INIT_SCRIPT, 0o755)
    _write_text(root / "usr/share/udhcpc/default.script", _UDHCPC_SCRIPT, 0o755)
    _write_text(root / "usr/sbin/twarga-guard", GUARD_SCRIPT, 0o755)
    (root / "etc/udhcpc/default.script").symlink_to("/usr/share/udhcpc/default.script")
    _write_text(root / "etc/acpi/PWRF/00000080", _ACPI_POWER_SCRIPT, 0o755)
    _write_text(root / "etc/acpid.conf", _ACPID_CONF)
    _write_text(root / "etc/profile", _PROFILE)
    _write_text(root / "etc/passwd", _PASSWD)
    _write_text(root / "etc/group", _GROUP)
    _write_text(root / "etc/shells", _SHELLS)
    _write_text(root / "etc/nsswitch.conf", _NSSWITCH)

    loaded = _install_modules(root, modules_dir, version)
    _write_text(root / "etc/twarga/modules", "".join(f"{p}\n" for p in loaded))


def _install_applets(root: Path, busybox: Path) -> None:
    """Symlink every applet of ``busybox`` to /bin/busybox at its usual place."""
    try:
        out = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageBuildError(
            f"cannot run {busybox} --list-full ({exc}): install {BUSYBOX_PACKAGE}",
            package=BUSYBOX_PACKAGE,
        ) from exc
    for line in out.split():
        rel = line.strip().lstrip("/")
        if "/" not in rel or ".." in rel.split("/") or rel == "bin/busybox":
            continue
        link = root / rel
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    if not (root / "bin/sh").is_symlink():
        raise ImageBuildError(f"{busybox} has no sh applet", package=BUSYBOX_PACKAGE)


def _module_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _module_plan(modules_dir: Path, wanted: Iterable[str]) -> list[str]:
    """Relative paths of the module files to load for ``wanted``, dependencies first."""
    deps: dict[str, list[str]] = {}
    path_of: dict[str, str] = {}
    for line in _read_lines(modules_dir / "modules.dep"):
        target, _, rest = line.partition(":")
        name = _module_name(target)
        path_of[name] = target
        deps[name] = [_module_name(d) for d in rest.split()]
    builtin = {_module_name(p) for p in _read_lines(modules_dir / "modules.builtin")}

    plan: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name in builtin:
            log.debug("module %s is built into the kernel", name)
            return
        target = path_of.get(name)
        if target is None or not (modules_dir / target).is_file():
            log.debug("module %s not present; skipped", name)
            return
        # modules.dep lists the deepest dependency last: load in reverse.
        for dep in reversed(deps.get(name, [])):
            visit(dep)
        plan.append(target)

    for name in wanted:
        visit(name.replace("-", "_"))
    return plan


def _decompress_module(src: Path) -> bytes:
    name = src.name
    if name.endswith(".ko"):
        return src.read_bytes()
    if name.endswith(".ko.xz"):
        return lzma.decompress(src.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(src.read_bytes())
    if name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ImageBuildError(
                f"{src} is zstd-compressed: install the Debian package zstd", package="zstd"
            )
        return subprocess.run(
            [zstd, "-dc", "--", str(src)], capture_output=True, check=True, timeout=60
        ).stdout
    raise ImageBuildError(f"unknown kernel module format: {src}")


def _install_modules(root: Path, modules_dir: Path, version: str) -> list[str]:
    """Copy (decompressed) modules into the initramfs; return their in-guest paths in order."""
    loaded: list[str] = []
    for target in _module_plan(modules_dir, MODULE_LOAD_ORDER):
        rel = target
        for suffix in (".xz", ".zst", ".gz"):
            rel = rel.removesuffix(suffix)
        guest_path = f"/lib/modules/{version}/{rel}"
        out = root / guest_path.lstrip("/")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(_decompress_module(modules_dir / target))
        loaded.append(guest_path)
    return loaded


_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-fA-F]+\)")


def _shared_libraries(program: Path) -> list[Path]:
    ldd = shutil.which("ldd")
    if ldd is None:
        raise ImageBuildError(
            "ldd is not installed: install the Debian package libc-bin", package=LDD_PACKAGE
        )
    try:
        out = subprocess.run(
            [ldd, str(program)], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageBuildError(f"ldd {program} failed: {exc}", package=LDD_PACKAGE) from exc
    libs: list[Path] = []
    for line in out.splitlines():
        if "not found" in line:
            raise ImageBuildError(f"{program} needs a missing library: {line.strip()}")
        match = _LDD_PATH.search(line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


def _install_dropbear(root: Path, dropbear: Path) -> None:
    """Copy dropbear (or its client) and every library ``ldd`` lists (with the loader) at
    the same paths."""
    for path in [dropbear, *_shared_libraries(dropbear)]:
        out = root / str(path).lstrip("/")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)  # follows symlinks: the real file under the listed name
        out.chmod(0o755)


def _pack_cpio(root: Path, cpio: str) -> bytes:
    """Return ``root`` as a newc cpio archive (owner root:root)."""
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for entry in sorted(dirnames + filenames):
            names.append(entry if rel_dir == "." else f"{rel_dir}/{entry}")
    file_list = b"".join(os.fsencode(n) + b"\0" for n in names)
    try:
        proc = subprocess.run(
            [cpio, "--quiet", "-o", "-H", "newc", "-0", "-R", "0:0", "--reproducible"],
            input=file_list,
            cwd=root,
            capture_output=True,
            check=True,
            timeout=120,
        )
    except subprocess.CalledProcessError as exc:
        raise ImageBuildError(
            f"cpio failed: {exc.stderr.decode(errors='replace').strip()}", package=CPIO_PACKAGE
        ) from exc
    return proc.stdout


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
