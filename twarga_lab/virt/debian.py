"""Build the image ``debian/12`` on this machine from Debian's archive (no image download).

``twarga-lab image build debian-12`` runs, under a lock so two builds never race:

1. ``mmdebstrap --variant=apt --include=...`` of ``bookworm`` into a work folder, from the
   machine's own Debian apt sources (``/etc/apt/sources.list.d/debian.sources`` and
   ``/etc/apt/sources.list``, passed to mmdebstrap as files, so the image's apt uses them too);
2. the rootfs is made into a VM image: DHCP on ``eth0`` only, cloud-init limited to the NoCloud
   seed, no apt timers or time sync that would try the internet, no host's resolver, hostname,
   machine id or SSH host keys, journald kept off the console;
3. ``mke2fs -t ext4 -d rootfs disk.raw 2G`` and ``qemu-img convert -O qcow2`` give
   ``base.qcow2``; the image's own kernel and initrd are copied next to it (direct kernel boot
   with ``root=/dev/vda console=ttyS0``);
4. ``image.json`` (what :class:`twarga_lab.virt.images.ImageStore` reads) records the recipe's
   hash: a later build with the same recipe does nothing; ``--force`` rebuilds.

The image is assembled in a hidden folder beside its final place and renamed into place; its
``image.json`` appears last, so a crash never leaves a half image that looks valid.

Why it is long: the recipe is one ordered build (bootstrap, guest configuration files,
disk, manifest) whose hash decides the cache; the files written into the guest are part of
it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from twarga_lab.errors import BackendError
from twarga_lab.virt.domain import SYSLOG_CHANNEL
from twarga_lab.virt.images import rsyslog_forwarding

__all__ = [
    "DEBIAN_12",
    "RECIPES",
    "DebianBuildError",
    "DebianImageBuilder",
    "DebianRecipe",
    "Progress",
    "default_apt_sources",
]

METADATA_FILE = "image.json"  # the image store's metadata (twarga_lab.virt.images)
BASE_DISK = "base.qcow2"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
#: Bumped when the build steps change in a way the recipe's fields do not show.
RECIPE_FORMAT = 1
HOST_APT_SOURCES = (
    Path("/etc/apt/sources.list.d/debian.sources"),
    Path("/etc/apt/sources.list"),
)
#: Serial console lines of a booted guest (regexes, multiline): the getty's prompt, and the
#: message cloud-init prints when it has applied the seed (keys, user, password, hostname),
#: after a kernel-style timestamp and "cloud-init[PID]: ".
LOGIN_BANNER = r"^Debian GNU/Linux 12 \S+ ttyS0$"
READY_BANNER = r"Cloud-init v\. \S+ finished at "

_NETWORK_INTERFACES = """\
# Written by Twarga Lab: the VM's only NIC is QEMU's user-mode network; DHCP on it, nothing else.
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp
"""

_CLOUD_CFG = """\
# Written by Twarga Lab. The per-VM seed is a NoCloud disk (label cidata); no network
# datasource is ever probed. The network is /etc/network/interfaces (DHCP on eth0).
datasource_list: [NoCloud, None]
# /etc/hosts names the VM (sudo resolves its own hostname).
manage_etc_hosts: true
network:
  config: disabled
apt:
  preserve_sources_list: true
package_update: false
package_upgrade: false
# What a lab VM's seed uses (users, keys, password, hostname, files, rsyslog, commands,
# growing the disk): every other module costs seconds of Python under TCG, and some
# (locale, apt, ntp) would write or fetch what a lab VM does not need.
cloud_init_modules:
  - migrator
  - seed_random
  - bootcmd
  - write-files
  - growpart
  - resizefs
  - disk_setup
  - mounts
  - set_hostname
  - update_hostname
  - update_etc_hosts
  - rsyslog
  - users-groups
  - ssh
cloud_config_modules:
  - set-passwords
  - timezone
  - runcmd
cloud_final_modules:
  - write-files-deferred
  - scripts-vendor
  - scripts-per-once
  - scripts-per-boot
  - scripts-per-instance
  - scripts-user
  - ssh-authkey-fingerprints
  - keys-to-console
  - final-message
  - power-state-change
# Modern keys only (RSA takes long to generate under TCG); none printed on the console.
ssh_genkeytypes: [ed25519, ecdsa]
ssh_quiet_keygen: true
system_info:
  default_user:
    name: twarga
    gecos: Twarga Lab
    groups: [adm, sudo]
    sudo: ["ALL=(ALL) NOPASSWD:ALL"]
    shell: /bin/bash
    lock_passwd: true
"""

_JOURNALD_CONF = """\
# Written by Twarga Lab: the serial console is the user's; logs go to journald and rsyslog.
[Journal]
ForwardToConsole=no
SystemMaxUse=64M
RuntimeMaxUse=32M
"""

_SYSCTL_CONSOLE = """\
# Written by Twarga Lab: only kernel errors on the serial console.
kernel.printk = 3 4 1 3
"""

_APT_PERIODIC = """\
// Written by Twarga Lab: a lab VM never updates or upgrades on its own.
APT::Periodic::Enable "0";
APT::Periodic::Update-Package-Lists "0";
APT::Periodic::Unattended-Upgrade "0";
"""

_SSH_HOSTKEYS_UNIT = """\
[Unit]
Description=SSH host keys of this VM (when cloud-init made none)
After=cloud-init.service
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=ssh.service
"""

_FSTAB = """\
# Written by Twarga Lab: the VM's disk is one ext4 filesystem.
/dev/vda / ext4 defaults,errors=remount-ro 0 0
"""

#: The initramfs only needs to find the virtio disk and mount ext4: a third of Debian's
#: default (MODULES=most), and less to unpack and probe under TCG at every boot.
_INITRAMFS_CONF = """\
# Written by Twarga Lab.
MODULES=list
"""
_INITRAMFS_MODULES = """\
# Written by Twarga Lab: what the initramfs needs to mount the VM's root disk.
virtio_pci
virtio_blk
ext4
"""
_HOSTS = "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost ip6-loopback\n"


@dataclass(frozen=True)
class DebianRecipe:
    """What goes into a Debian image; its :meth:`digest` decides whether a build is current."""

    key: str  # the command line's name, e.g. ``debian-12``
    image: str  # the image's name, e.g. ``debian/12``
    version: str
    suite: str
    packages: tuple[str, ...]
    description: str
    fs_size: str = "2G"
    variant: str = "apt"
    #: ``net.ifnames=0``: the NIC is eth0 from the initramfs on (ifupdown configures eth0).
    cmdline: str = "root=/dev/vda console=ttyS0 net.ifnames=0 quiet"
    default_user: str = "twarga"
    min_disk_gb: int = 10
    min_ram_mb: int = 512
    #: Files written into the rootfs: (path, mode, content).
    files: tuple[tuple[str, int, str], ...] = ()
    #: Units masked (linked to /dev/null): nothing that talks to the internet at boot.
    masked: tuple[str, ...] = ()
    #: Symlinks made in the rootfs: (path, target).
    links: tuple[tuple[str, str], ...] = ()
    #: Files and globs removed from the rootfs (host leftovers, per-machine identities).
    removed: tuple[str, ...] = ()
    empty: tuple[str, ...] = ()  # files truncated to nothing (machine-id, resolv.conf)
    extra: dict[str, object] = field(default_factory=dict)

    def digest(self) -> str:
        """A hash of everything the image is built from (not of the archive's contents)."""
        data = {
            "format": RECIPE_FORMAT,
            "suite": self.suite,
            "variant": self.variant,
            "packages": sorted(self.packages),
            "fs_size": self.fs_size,
            "cmdline": self.cmdline,
            "files": sorted([p, m, c] for p, m, c in self.files),
            "masked": sorted(self.masked),
            "links": sorted(self.links),
            "removed": sorted(self.removed),
            "empty": sorted(self.empty),
            "metadata": self.metadata(),
        }
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def metadata(self) -> dict[str, object]:
        """The fields of ``image.json`` that come from the recipe."""
        return {
            "name": self.image,
            "kind": "disk",
            "os_type": "debian",
            "family": "debian",
            "version": self.version,
            "description": self.description,
            "base_disk": BASE_DISK,
            "kernel": KERNEL_FILE,
            "initrd": INITRD_FILE,
            "boot": "direct-kernel",
            "cmdline": self.cmdline,
            "root_device": "/dev/vda",
            "cloud_init": True,
            "seed": "cloud-init-nocloud",
            "default_user": self.default_user,
            "min_disk_gb": self.min_disk_gb,
            "min_ram_mb": self.min_ram_mb,
            "login_banner": LOGIN_BANNER,
            "ready_banner": READY_BANNER,
            **self.extra,
        }


DEBIAN_12 = DebianRecipe(
    key="debian-12",
    image="debian/12",
    version="12",
    suite="bookworm",
    packages=(
        "systemd-sysv",
        "openssh-server",
        "cloud-init",
        "linux-image-cloud-amd64",
        "ifupdown",
        "isc-dhcp-client",
        "netbase",
        "rsyslog",
        "sudo",
        "python3",
        "cloud-guest-utils",
        # systemctl, loginctl and hostnamectl as a user need the system bus and logind.
        "dbus",
        "libpam-systemd",
    ),
    description="Debian 12 (bookworm) built here from Debian's archive: systemd, OpenSSH, "
    "cloud-init, rsyslog; user twarga",
    files=(
        ("etc/hostname", 0o644, "debian\n"),
        ("etc/hosts", 0o644, _HOSTS),
        ("etc/fstab", 0o644, _FSTAB),
        ("etc/initramfs-tools/conf.d/90-twarga.conf", 0o644, _INITRAMFS_CONF),
        ("etc/initramfs-tools/modules", 0o644, _INITRAMFS_MODULES),
        ("etc/network/interfaces", 0o644, _NETWORK_INTERFACES),
        ("etc/cloud/cloud.cfg.d/90_twarga.cfg", 0o644, _CLOUD_CFG),
        ("etc/systemd/journald.conf.d/90-twarga.conf", 0o644, _JOURNALD_CONF),
        # In the image, not only in the seed, so sshd's very first lines reach the SOC:
        # rsyslog starts before cloud-init could write the drop-in.
        ("etc/rsyslog.d/10-twarga-soc.conf", 0o644, rsyslog_forwarding(SYSLOG_CHANNEL)),
        ("etc/sysctl.d/90-twarga-console.conf", 0o644, _SYSCTL_CONSOLE),
        ("etc/apt/apt.conf.d/20auto-upgrades", 0o644, _APT_PERIODIC),
        ("etc/systemd/system/twarga-ssh-hostkeys.service", 0o644, _SSH_HOSTKEYS_UNIT),
    ),
    masked=(
        "apt-daily.timer",
        "apt-daily.service",
        "apt-daily-upgrade.timer",
        "apt-daily-upgrade.service",
        "unattended-upgrades.service",
        "systemd-timesyncd.service",
        "man-db.timer",
        "dpkg-db-backup.timer",
        "getty-static.service",  # gettys on tty2-6 when there is no logind: no VGA here
    ),
    links=(
        # Classic NIC names: the user-mode NIC is eth0 whatever its PCI slot.
        ("etc/systemd/network/99-default.link", "/dev/null"),
        (
            "etc/systemd/system/ssh.service.wants/twarga-ssh-hostkeys.service",
            "/etc/systemd/system/twarga-ssh-hostkeys.service",
        ),
    ),
    removed=(
        "etc/ssh/ssh_host_*",  # every VM gets its own (cloud-init's ssh module)
        "var/lib/dbus/machine-id",
        "var/lib/systemd/random-seed",
        "etc/systemd/system/timers.target.wants/apt-daily.timer",
        "etc/systemd/system/timers.target.wants/apt-daily-upgrade.timer",
        "etc/systemd/system/timers.target.wants/dpkg-db-backup.timer",
    ),
    # The host's resolver (a private address) and machine id never reach a VM.
    empty=("etc/machine-id", "etc/resolv.conf"),
)

RECIPES: dict[str, DebianRecipe] = {DEBIAN_12.key: DEBIAN_12}


class DebianBuildError(BackendError):
    """A step of a Debian image build failed; the message says what to check."""

    default_reason = "image_build_failed"


def default_apt_sources(candidates: Sequence[Path] = HOST_APT_SOURCES) -> list[Path]:
    """The machine's Debian apt sources that have at least one entry."""
    found = []
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        lines = [line.strip() for line in text.splitlines()]
        if any(line and not line.startswith("#") for line in lines):
            found.append(path)
    return found


def source_uris(sources: Sequence[Path]) -> list[str]:
    """The archive URIs named in apt sources files (deb822 ``URIs:`` or one-line ``deb``)."""
    uris: list[str] = []
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for raw in text.splitlines():
            line = raw.strip()
            if line.lower().startswith("uris:"):
                uris.extend(line.split(":", 1)[1].split())
            elif line.startswith(("deb ", "deb-src ")):
                words = [w for w in re.sub(r"\[[^]]*\]", " ", line).split()[1:] if w]
                if words:
                    uris.append(words[0])
    return list(dict.fromkeys(uris))


class Progress:
    """Build steps as a bar on a terminal, or one line a step in a log (on stderr)."""

    WIDTH = 30

    def __init__(self, label: str, stream: IO[str] | None = None, *, quiet: bool = False) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.percent = 0
        self.started = time.monotonic()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def step(self, percent: int, text: str) -> None:
        """Show that the build is ``percent`` done and doing ``text``."""
        self.percent = max(self.percent, min(100, percent))
        if self.quiet:
            return
        filled = self.WIDTH * self.percent // 100
        bar = "#" * filled + "." * (self.WIDTH - filled)
        elapsed = time.monotonic() - self.started
        line = f"{self.label} [{bar}] {self.percent:3d}% {elapsed:5.0f}s {text}"
        if self._tty:
            self.stream.write("\r\x1b[K" + line)
            if self.percent >= 100:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self, text: str) -> None:
        self.step(100, text)


#: mmdebstrap's status lines (``I: ...`` on stderr) and how far the whole build is then.
_MMDEBSTRAP_STEPS: tuple[tuple[str, int, str], ...] = (
    ("running apt-get update", 5, "reading the apt sources"),
    ("downloading packages", 10, "downloading packages"),
    ("extracting archives", 25, "unpacking the essential packages"),
    ("installing essential packages", 30, "installing the essential packages"),
    ("installing remaining packages", 40, "installing systemd, OpenSSH, cloud-init, kernel"),
    ("cleaning package lists", 62, "cleaning apt's lists and cache"),
)


@dataclass
class BuildResult:
    """What a build did: ``built`` False when the cached image was current."""

    image: str
    folder: Path
    built: bool
    seconds: float
    size_bytes: int


Runner = Callable[[list[str], Path], None]


class DebianImageBuilder:
    """Builds one recipe into ``<images_root>/<recipe.image>``."""

    def __init__(
        self,
        images_root: Path,
        recipe: DebianRecipe = DEBIAN_12,
        *,
        apt_sources: Sequence[Path] | None = None,
        work_dir: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.root = Path(images_root)
        self.recipe = recipe
        self.apt_sources = list(apt_sources) if apt_sources is not None else default_apt_sources()
        self.work_dir = work_dir
        self.progress = progress or Progress(recipe.key)
        self.folder = self.root / recipe.image

    # -- cache ------------------------------------------------------------------------

    def current(self) -> bool:
        """Whether the image exists whole, built from this very recipe."""
        from twarga_lab.virt.images import ImageStore

        try:
            data = json.loads((self.folder / METADATA_FILE).read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(data, dict) or data.get("recipe") != self.recipe.digest():
            return False
        return ImageStore(self.root).exists(self.recipe.image)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / f".{self.recipe.key}.lock"
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.progress.step(0, "waiting for another build of this image to finish")
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- build ------------------------------------------------------------------------

    def build(self, *, force: bool = False) -> BuildResult:
        """Build the image unless it is current (``force`` rebuilds)."""
        started = time.monotonic()
        with self._lock():
            self._remove_leftovers()
            if not force and self.current():
                return BuildResult(
                    self.recipe.image, self.folder, False, time.monotonic() - started,
                    _folder_size(self.folder),
                )  # fmt: skip
            self._check_tools()
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self.folder.parent.chmod(0o755)
            staging = self.folder.with_name(f".{self.folder.name}.build-{secrets.token_hex(4)}")
            staging.mkdir(mode=0o755)
            try:
                with tempfile.TemporaryDirectory(
                    prefix=f"twarga-{self.recipe.key}-", dir=self.work_dir
                ) as work:
                    metadata = self._build_into(staging, Path(work))
                metadata["build_seconds"] = round(time.monotonic() - started, 1)
                _write_json(staging / (METADATA_FILE + ".tmp"), metadata)
                self._place(staging)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        seconds = time.monotonic() - started
        size = _folder_size(self.folder)
        self.progress.done(f"{self.recipe.image} is built ({size / 2**20:.0f} MiB)")
        return BuildResult(self.recipe.image, self.folder, True, seconds, size)

    def _remove_leftovers(self) -> None:
        """Folders of a build that crashed (we hold the lock: no build is running)."""
        parent = self.folder.parent
        if not parent.is_dir():
            return
        for pattern in (f".{self.folder.name}.build-*", f".{self.folder.name}.old-*"):
            for leftover in parent.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
        (self.folder / (METADATA_FILE + ".tmp")).unlink(missing_ok=True)

    def _check_tools(self) -> None:
        for tool, package in (
            ("mmdebstrap", "mmdebstrap"),
            ("mke2fs", "e2fsprogs"),
            ("qemu-img", "qemu-utils"),
        ):
            if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
                raise DebianBuildError(f"{tool} is missing: install Debian's {package}")
        if os.geteuid() != 0:
            raise DebianBuildError("building a Debian image needs root (mmdebstrap's root mode)")

    def mmdebstrap_argv(self, rootfs: Path) -> list[str]:
        """The mmdebstrap command line (sources files last: their entries are the mirrors)."""
        return [
            "mmdebstrap",
            f"--variant={self.recipe.variant}",
            "--include=" + ",".join(self.recipe.packages),
            "--format=directory",
            self.recipe.suite,
            str(rootfs),
            *[str(p) for p in self.apt_sources],
        ]

    def _build_into(self, staging: Path, work: Path) -> dict[str, object]:
        rootfs = work / "rootfs"
        log_path = work / "mmdebstrap.log"
        where = ", ".join(str(p) for p in self.apt_sources) or "Debian's default mirror"
        self.progress.step(1, f"mmdebstrap {self.recipe.suite} from {where}")
        self._mmdebstrap(rootfs, log_path)
        self.progress.step(65, "making the rootfs a VM image (network, cloud-init, timers)")
        customize_rootfs(rootfs, self.recipe)
        self.progress.step(67, "initramfs with the virtio disk and ext4 only")
        _run(["chroot", str(rootfs), "update-initramfs", "-u", "-k", "all"], "update-initramfs")
        kernel_version = copy_boot_files(rootfs, staging)
        self.progress.step(70, f"ext4 filesystem of {self.recipe.fs_size} (mke2fs -d)")
        raw = work / "disk.raw"
        _run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-d", str(rootfs), str(raw),
             self.recipe.fs_size],
            "mke2fs",
        )  # fmt: skip
        shutil.rmtree(rootfs)
        self.progress.step(85, "qcow2 base disk (qemu-img convert)")
        base = staging / BASE_DISK
        _run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(base)], "qemu-img")
        raw.unlink()
        for path in staging.iterdir():
            path.chmod(0o644)
        metadata = self.recipe.metadata()
        metadata.update(
            {
                "kernel_version": kernel_version,
                "recipe": self.recipe.digest(),
                "recipe_name": self.recipe.key,
                "suite": self.recipe.suite,
                "packages": list(self.recipe.packages),
                "apt_sources": [str(p) for p in self.apt_sources],
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        return metadata

    def _mmdebstrap(self, rootfs: Path, log_path: Path) -> None:
        argv = self.mmdebstrap_argv(rootfs)
        with open(log_path, "w+") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.PIPE, text=True
            )
            assert proc.stderr is not None
            for line in proc.stderr:
                log.write(line)
                for needle, percent, text in _MMDEBSTRAP_STEPS:
                    if needle in line:
                        self.progress.step(percent, text)
            status = proc.wait()
            log.flush()
            log.seek(0)
            output = log.read()
        if status != 0:
            raise DebianBuildError(self._mmdebstrap_failure(output, status))

    def _mmdebstrap_failure(self, output: str, status: int) -> str:
        """One line: which apt source failed and what to check."""
        sources = ", ".join(str(p) for p in self.apt_sources) or "mmdebstrap's default mirror"
        uris = ", ".join(source_uris(self.apt_sources)) or "http://deb.debian.org/debian"
        unreachable = re.search(
            r"(Failed to fetch|Could not (connect|resolve)|Unable to connect|Temporary failure"
            r"|Connection (refused|failed|timed out)|apt-get update.*failed|Err:\d+)",
            output,
        )
        detail = _key_error_line(output)
        if unreachable:
            return (
                f"cannot reach Debian's archive at {uris} (apt sources: {sources}): check that "
                f"this machine reaches it (`apt-get update` should work) or pass --apt-sources "
                f"FILE; mmdebstrap said: {detail}"
            )
        return f"mmdebstrap failed (exit {status}) with apt sources {sources} ({uris}): {detail}"

    def _place(self, staging: Path) -> None:
        """Rename the finished image into place; its image.json appears last."""
        old: Path | None = None
        if self.folder.exists():
            (self.folder / METADATA_FILE).unlink(missing_ok=True)  # no longer a valid image
            old = self.folder.with_name(f".{self.folder.name}.old-{secrets.token_hex(4)}")
            os.rename(self.folder, old)
        os.rename(staging, self.folder)
        os.replace(self.folder / (METADATA_FILE + ".tmp"), self.folder / METADATA_FILE)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _inside(rootfs: Path, relative: str) -> Path:
    """``rootfs / relative`` with no symlink among its parents (a link in the rootfs must
    never make the build write on the host)."""
    path = rootfs / relative
    current = rootfs
    for part in Path(relative).parent.parts:
        current = current / part
        if current.is_symlink():
            raise DebianBuildError(f"{current} is a symlink in the rootfs; refusing to write")
    return path


def customize_rootfs(rootfs: Path, recipe: DebianRecipe) -> None:
    """Apply ``recipe``'s files, masks, links and removals to an unpacked rootfs."""
    for pattern in recipe.removed:
        for path in rootfs.glob(pattern):
            if path.is_symlink() or path.is_file():
                path.unlink()
    for relative in recipe.empty:
        path = _inside(rootfs, relative)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.write_text("")
        path.chmod(0o444 if relative == "etc/machine-id" else 0o644)
    for relative, mode, content in recipe.files:
        path = _inside(rootfs, relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.write_text(content)
        path.chmod(mode)
    links = [(f"etc/systemd/system/{unit}", "/dev/null") for unit in recipe.masked]
    for relative, target in [*links, *recipe.links]:
        path = _inside(rootfs, relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(target)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def copy_boot_files(rootfs: Path, dest: Path) -> str:
    """Copy the newest ``/boot/vmlinuz-*`` and its initrd to ``dest``; return its version."""
    kernels = [p for p in (rootfs / "boot").glob("vmlinuz-*") if p.is_file()]
    if not kernels:
        raise DebianBuildError(f"no kernel in {rootfs / 'boot'}: is linux-image-* installed?")
    kernel = max(kernels, key=lambda p: _version_key(p.name))
    version = kernel.name.removeprefix("vmlinuz-")
    initrd = rootfs / "boot" / f"initrd.img-{version}"
    if not initrd.is_file():
        raise DebianBuildError(f"no initrd for kernel {version} in {rootfs / 'boot'}")
    shutil.copyfile(kernel, dest / KERNEL_FILE)
    shutil.copyfile(initrd, dest / INITRD_FILE)
    return version


def _key_error_line(output: str) -> str:
    """The line of mmdebstrap's output that says what went wrong (apt's first error)."""
    lines = [" ".join(line.split()) for line in output.splitlines() if line.strip()]
    for wanted in (
        lambda line: "Failed to fetch" in line,
        lambda line: line.startswith("E:") and "mmdebstrap failed to run" not in line,
    ):
        for line in lines:
            if wanted(line):
                return line
    return lines[-1] if lines else "no output"


def _run(argv: list[str], what: str) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=1800)
    except subprocess.CalledProcessError as e:
        raise DebianBuildError(f"{what} failed: {(e.stderr or e.stdout).strip()}") from e


def _write_json(path: Path, data: dict[str, object]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    path.chmod(0o644)


def _folder_size(folder: Path) -> int:
    """Bytes the image's files take on disk."""
    total = 0
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.is_file():
            total += path.stat().st_blocks * 512
    return total
