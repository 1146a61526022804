"""Bootable images, per-VM qcow2 overlays and cloud-init NoCloud seeds.

An image lives in ``<vms_dir>/images/<name>/`` with an ``image.json`` describing it:

* ``kernel`` images (the default ``twarga/tiny``) boot a kernel and initramfs directly and
  get a blank qcow2 base for their data disk;
* ``disk`` images (cloud images) boot their own qcow2 and get a cloud-init seed.

Every VM's disk is a qcow2 overlay on its image's base, sized to what the user asked for.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from twarga_lab.errors import BackendError, InvalidRequest, NotFound

log = logging.getLogger(__name__)
IMAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}(/[a-z0-9][a-z0-9._-]{0,62})?$")
TINY_IMAGE = "twarga/tiny"
METADATA_FILE = "image.json"
#: What twarga/tiny's /init prints on the serial console once dropbear runs (a line).
TINY_READY_BANNER = r"^Twarga Lab VM \S+ is up$"


@dataclass(frozen=True)
class Image:
    """A bootable image as users see it and as the VM service needs it."""

    name: str
    kind: str  # "kernel" or "disk"
    os_type: str
    description: str
    base_disk: Path
    kernel: Path | None = None
    initrd: Path | None = None
    kernel_version: str | None = None
    cloud_init: bool = False
    min_disk_gb: int = 1
    # A disk image booted with its own kernel: the kernel command line its root needs.
    cmdline: tuple[tuple[str, str], ...] = ()
    # Who the owner logs in as (cloud-init's user, e.g. twarga); None: root.
    default_user: str | None = None
    # A regular expression a line of the serial console matches once the guest has booted
    # (services.vms.readiness); None: ready as soon as it runs.
    ready_banner: str | None = None

    def to_json(self) -> dict[str, object]:
        """The public view of the image (no host paths)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "os_type": self.os_type,
            "description": self.description,
            "cloud_init": self.cloud_init,
            "min_disk_gb": self.min_disk_gb,
            "kernel_version": self.kernel_version,
        }


def parse_cmdline(text: str) -> tuple[tuple[str, str], ...]:
    """``"root=/dev/vda quiet"`` as ``(("root", "/dev/vda"), ("quiet", ""))``; the domain
    builder checks every key and value before they reach the domain XML."""
    return tuple((key, value) for key, _, value in (word.partition("=") for word in text.split()))


def qemu_img(*args: str) -> str:
    """Run ``qemu-img`` and return its output; failures become BackendError."""
    try:
        done = subprocess.run(
            ["qemu-img", *args], check=True, capture_output=True, text=True, timeout=120
        )
    except FileNotFoundError as e:
        raise BackendError("qemu-img is missing: install Debian's qemu-utils") from e
    except subprocess.CalledProcessError as e:
        raise BackendError(f"qemu-img {args[0]} failed: {e.stderr.strip()}") from e
    return done.stdout


QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# Debian's build of libvirt runs QEMU as this user and group (qemu.conf can change both).
DEFAULT_QEMU_USER = DEFAULT_QEMU_GROUP = "libvirt-qemu"
_QEMU_CONF_LINE = re.compile(r"\s*(user|group)\s*=\s*\"([^\"]+)\"\s*")


@dataclass(frozen=True)
class FileOwner:
    """The account (uid, gid) that QEMU runs as under libvirt's system daemon."""

    uid: int
    gid: int


def qemu_account(conf: Path = QEMU_CONF) -> FileOwner | None:
    """Who libvirt runs QEMU as: ``user``/``group`` of ``qemu.conf``, else Debian's
    ``libvirt-qemu`` user and group; None when that account does not exist."""
    import grp
    import pwd

    settings: dict[str, str] = {}
    try:
        for line in conf.read_text().splitlines():
            match = _QEMU_CONF_LINE.fullmatch(line)
            if match:
                settings[match.group(1)] = match.group(2)
    except OSError:
        pass  # not readable or absent: libvirt uses its built-in defaults, and so do we
    try:
        user = pwd.getpwnam(settings.get("user", DEFAULT_QEMU_USER))
    except KeyError:
        return None
    try:
        gid = grp.getgrnam(settings.get("group", DEFAULT_QEMU_GROUP)).gr_gid
    except KeyError:
        gid = user.pw_gid
    return FileOwner(user.pw_uid, gid)


def secure_instance_dir(folder: Path, owner: FileOwner | None) -> None:
    """Make a VM's folder 0700 and its files (disk, seeds, console log) 0600, all owned by
    QEMU's account: other local accounts can neither list the folder nor read a disk.

    libvirt's dynamic ownership chowns the disks to QEMU's account at start and gives them
    back at stop; owning them (and the folder) already keeps both states private and
    reachable by QEMU. The service itself runs as root, which needs no permission bits.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for path in [folder, *folder.iterdir()]:
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            continue  # never follow a link, nor touch sockets
        path.chmod(0o700 if path.is_dir() else 0o600)
        if owner is not None:
            os.chown(path, owner.uid, owner.gid, follow_symlinks=False)


def file_inside(folder: Path, name: object) -> Path | None:
    """``folder / name`` if ``name`` is a relative path that stays inside ``folder`` (no
    ``..``, not absolute, no link leading out), else None."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return None
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        return None
    path = folder / relative
    try:
        if not path.resolve().is_relative_to(folder.resolve()):
            return None
    except (OSError, RuntimeError):
        return None
    return path


def backing_chain_inside(disk: Path, folder: Path) -> bool:
    """Whether every file of ``disk``'s backing chain is inside ``folder`` (a qcow2 can
    name any host file as its backing file, which QEMU would then open and read)."""
    try:
        chain = json.loads(qemu_img("info", "--output=json", "--backing-chain", "-U", str(disk)))
    except (BackendError, ValueError):
        return False  # unreadable, or its backing file is missing
    if isinstance(chain, dict):
        chain = [chain]
    root = folder.resolve()
    for layer in chain:
        for key in ("filename", "full-backing-filename", "backing-filename"):
            name = layer.get(key)
            if not name:
                continue
            if ":" in name:
                return False  # json:{...}, nbd://, http:// ...: not a file of this folder
            path = Path(name)
            if not path.is_absolute():
                path = Path(layer.get("filename", str(disk))).parent / path
            if not path.resolve().is_relative_to(root):
                return False
    return True


def create_overlay(base: Path, dest: Path, size_gb: int) -> None:
    """A qcow2 overlay ``dest`` backed by ``base`` with a virtual size of ``size_gb``.

    Written under a temporary name and renamed: a crash never leaves a half-made ``dest``
    that a later start would take for a whole one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(dest)
    partial.unlink(missing_ok=True)
    try:
        qemu_img(
            "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(partial),
            f"{size_gb}G",
        )  # fmt: skip
        partial.chmod(0o600)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


def partial_path(dest: Path) -> Path:
    """Where ``dest`` is written before it is renamed into place (``.NAME.tmp``)."""
    return dest.with_name(f".{dest.name}.tmp")


def virtual_size_bytes(path: Path) -> int:
    """The guest-visible size of a disk image."""
    return int(json.loads(qemu_img("info", "--output=json", "-U", str(path)))["virtual-size"])


def rsyslog_forwarding(channel: str) -> str:
    """An rsyslog drop-in sending auth and authpriv (sshd's log) into the virtio-serial port
    ``channel`` in the classic format the SOC reads; its own queue, so a port nobody reads on
    the host side never stalls rsyslog."""
    return (
        "# Written by Twarga Lab: the SOC reads this port.\n"
        'template(name="TwargaSyslog" type="string" '
        'string="<%PRI%>%TIMESTAMP% %HOSTNAME% %syslogtag%%msg:::sp-if-no-1st-sp%%msg%\\n")\n'
        'auth,authpriv.* action(type="omfile" '
        f'file="/dev/virtio-ports/{channel}" template="TwargaSyslog" '
        'queue.type="LinkedList" queue.size="10000" action.resumeRetryCount="-1")\n'
    )


# A character beyond U+FFFF as JSON writes it: a surrogate pair (after an even number of
# backslashes, so not the text of an escaped backslash).
_SURROGATE_PAIR = re.compile(r"(?<!\\)((?:\\\\)*)\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})")


def yaml_json(data: object, indent: int | None = None) -> str:
    """``data`` as JSON that YAML reads back equal: characters beyond U+FFFF (an emoji in
    a key's comment) as YAML's ``\\U`` escapes, since PyYAML (what cloud-init reads with)
    takes JSON's surrogate pairs for two lone surrogates."""

    def one_escape(m: re.Match[str]) -> str:
        code = 0x10000 + ((int(m[2], 16) - 0xD800) << 10) + (int(m[3], 16) - 0xDC00)
        return f"{m[1]}\\U{code:08x}"

    return _SURROGATE_PAIR.sub(one_escape, json.dumps(data, indent=indent))


def build_seed_iso(
    dest: Path,
    *,
    instance_id: str,
    hostname: str,
    ssh_keys: list[str],
    user: str = "twarga",
    password_hash: str | None = None,
    syslog_channel: str | None = None,
    segments: Sequence[tuple[str, str]] = (),
) -> Path:
    """A cloud-init NoCloud seed (ISO 9660 labelled ``cidata``) with the user's SSH keys.

    ``password_hash`` (a ``$6$`` crypt hash, never the password) lets ``user`` log in with
    the password too; ``syslog_channel`` names the virtio-serial port rsyslog forwards the
    auth log into. ``segments`` (``(mac, "ADDRESS/PREFIX")`` pairs, one per lab segment
    NIC) add a network-config (v2): the user-network NIC keeps DHCP, each segment NIC,
    matched by its MAC, gets its static address and no gateway. Images whose cloud.cfg
    turns cloud-init's network step off (``debian/12`` keeps ifupdown's DHCP on eth0) get
    the same addresses from a ``bootcmd`` run at every boot."""
    from twarga_lab.virt.seed import cloud_network_config, cloud_segment_bootcmd

    network_config = cloud_network_config(segments) if segments else None
    account: dict[str, object] = {
        "name": user,
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "shell": "/bin/bash",
        # An empty list is "invalid cloud-config" to cloud-init: no keys, no key.
        **({"ssh_authorized_keys": ssh_keys} if ssh_keys else {}),
    }
    if password_hash:
        account.update(passwd=password_hash, lock_passwd=False)
    user_data: dict[str, object] = {
        "hostname": hostname,
        "users": [account],
        "ssh_pwauth": bool(password_hash),
    }
    if segments:
        user_data["bootcmd"] = cloud_segment_bootcmd(segments)
    if syslog_channel:
        user_data["write_files"] = [
            {
                "path": "/etc/rsyslog.d/10-twarga-soc.conf",
                "permissions": "0644",
                "content": rsyslog_forwarding(syslog_channel),
            }
        ]
        # write_files runs while rsyslog may already be up: make it read the drop-in now.
        user_data["runcmd"] = [["systemctl", "restart", "rsyslog"]]
    meta_data = {"instance-id": instance_id, "local-hostname": hostname}
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        # JSON is valid YAML; building it from objects keeps keys from injecting directives.
        (staging / "user-data").write_text("#cloud-config\n" + yaml_json(user_data, indent=1))
        (staging / "meta-data").write_text(yaml_json(meta_data))
        files = [staging / "user-data", staging / "meta-data"]
        if network_config is not None:
            (staging / "network-config").write_text(yaml_json(network_config, indent=1))
            files.append(staging / "network-config")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tool = shutil.which("genisoimage") or shutil.which("mkisofs")
        if tool is None:
            raise BackendError("genisoimage is missing: install Debian's genisoimage")
        partial = partial_path(dest)
        subprocess.run(
            [
                tool,
                "-quiet",
                "-output",
                str(partial),
                "-volid",
                "cidata",
                "-joliet",
                "-rock",
                *(str(f) for f in files),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        partial.chmod(0o600)
        os.replace(partial, dest)  # a crash leaves at most a .tmp file, never a partial seed
    return dest


class ImageStore:
    """The images under ``root`` (``<vms_dir>/images``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # (path, mtime, size) -> whether its qcow2 backing chain stays in its folder.
        self._chain_checked: dict[tuple[str, int, int], bool] = {}

    def _dir(self, name: str) -> Path:
        if not IMAGE_NAME_RE.fullmatch(name):
            raise InvalidRequest(f"{name!r} is not a valid image name", "bad_image_name")
        return self.root / name

    def list(self) -> list[Image]:
        """Every image whose files are all present, sorted by name."""
        images = []
        for meta in sorted(self.root.glob(f"**/{METADATA_FILE}")):
            image = self._load(meta)
            if image is not None:
                images.append(image)
        return images

    def get(self, name: str) -> Image:
        """The bootable image ``name``; NotFound if it is absent or incomplete."""
        if not IMAGE_NAME_RE.fullmatch(name):
            raise NotFound(f"image {name!r} does not exist", "no_image")
        image = self._load(self.root / name / METADATA_FILE)
        if image is None:
            raise NotFound(f"image {name!r} does not exist", "no_image")
        return image

    def exists(self, name: str) -> bool:
        """Whether ``name`` is a bootable image."""
        try:
            self.get(name)
        except NotFound:
            return False
        return True

    def _load(self, meta: Path) -> Image | None:
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        folder = meta.parent
        # Every file an image names lives in its folder: image.json must not point QEMU (which
        # libvirt chowns files for) at /etc/shadow or at another user's disk.
        files_of: dict[str, Path | None] = {}
        for key in ("base_disk", "kernel", "initrd"):
            if key != "base_disk" and not data.get(key):
                files_of[key] = None
                continue
            inside = file_inside(folder, data.get(key))
            if inside is None:
                log.warning("image %s: %s %r is not a file in %s", meta, key, data.get(key), folder)
                return None
            files_of[key] = inside
        base_disk = files_of["base_disk"]
        assert base_disk is not None
        image = Image(
            name=data["name"],
            kind=data["kind"],
            os_type=data.get("os_type", "linux"),
            description=data.get("description", ""),
            base_disk=base_disk,
            kernel=files_of["kernel"],
            initrd=files_of["initrd"],
            kernel_version=data.get("kernel_version"),
            cloud_init=bool(data.get("cloud_init", False)),
            min_disk_gb=int(data.get("min_disk_gb", 1)),
            cmdline=parse_cmdline(str(data.get("cmdline") or "")),
            default_user=data.get("default_user") or None,
            ready_banner=data.get("ready_banner") or None,
        )
        files = [image.base_disk, image.kernel, image.initrd]
        if not all(f.is_file() for f in files if f is not None):
            return None
        if not self._chain_inside(image.base_disk, folder):
            log.warning("image %s: %s has a backing file outside %s", meta, base_disk, folder)
            return None
        return image

    def _chain_inside(self, disk: Path, folder: Path) -> bool:
        stat = disk.stat()
        key = (str(disk), stat.st_mtime_ns, stat.st_size)
        if key not in self._chain_checked:
            self._chain_checked[key] = backing_chain_inside(disk, folder)
        return self._chain_checked[key]

    def _write_metadata(self, folder: Path, image: Image) -> None:
        data = asdict(image)
        for key in ("base_disk", "kernel", "initrd"):
            if data[key] is not None:
                data[key] = Path(data[key]).name
        tmp = folder / (METADATA_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        # Written last and renamed: a half-made image never has an image.json.
        os.replace(tmp, folder / METADATA_FILE)

    def build_tiny(self, *, force: bool = False) -> Image:
        """Build ``twarga/tiny`` from Debian's cloud kernel and busybox (a few seconds)."""
        from twarga_lab.virt.tinyimage import build_tiny_image, load_tiny_image

        folder = self._dir(TINY_IMAGE)
        # An image of an older recipe (another /init) is rebuilt, not reused.
        if not force and self.exists(TINY_IMAGE) and load_tiny_image(folder) is not None:
            image = self.get(TINY_IMAGE)
            if image.ready_banner is None:
                # Metadata older than the banner: only image.json is written again.
                image = replace(image, ready_banner=TINY_READY_BANNER)
                self._write_metadata(folder, image)
            return image
        folder.mkdir(parents=True, exist_ok=True)
        (folder / METADATA_FILE).unlink(missing_ok=True)
        files = build_tiny_image(folder)
        base = folder / "base.qcow2"
        base.unlink(missing_ok=True)
        qemu_img("create", "-q", "-f", "qcow2", str(base), "1G")
        image = Image(
            name=TINY_IMAGE,
            kind="kernel",
            os_type="linux",
            description="Busybox on Debian's cloud kernel: boots to a shell in seconds",
            base_disk=base,
            kernel=files.kernel,
            initrd=files.initrd,
            kernel_version=files.kernel_version,
            ready_banner=TINY_READY_BANNER,
        )
        self._write_metadata(folder, image)
        return image

    def add_disk_image(
        self, name: str, source: Path, *, os_type: str = "linux", description: str = ""
    ) -> Image:
        """Register a local qcow2 cloud image as ``name`` (copied, then checked by qemu-img)."""
        folder = self._dir(name)
        if not source.is_file():
            raise NotFound(f"no such file: {source}", "no_file")
        info = json.loads(qemu_img("info", "--output=json", str(source)))
        if info.get("backing-filename"):
            raise InvalidRequest(
                f"{source} has a backing file ({info['backing-filename']}); flatten it with "
                "`qemu-img convert -O qcow2` first",
                "bad_image_backing",
            )
        if info.get("format") != "qcow2":
            raise InvalidRequest(
                f"{source} is {info.get('format')}, not qcow2; convert it with "
                "`qemu-img convert -O qcow2`",
                "bad_image_format",
            )
        folder.mkdir(parents=True, exist_ok=True)
        (folder / METADATA_FILE).unlink(missing_ok=True)
        base = folder / "base.qcow2"
        shutil.copyfile(source, base)
        size_gb = max(1, -(-int(info["virtual-size"]) // 2**30))
        image = Image(
            name=name,
            kind="disk",
            os_type=os_type,
            description=description or f"cloud image from {source.name}",
            base_disk=base,
            cloud_init=True,
            min_disk_gb=size_gb,
        )
        self._write_metadata(folder, image)
        return image
