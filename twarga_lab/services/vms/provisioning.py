"""What makes a VM's files and domain: its row's SSH port and password, its instance
folder (disk overlay, cloud-init or tiny seed, SSH host key, console log), the rights on
them, and the libvirt :class:`~twarga_lab.virt.domain.DomainSpec` built from the row.

Everything here is blocking (database, disk, qemu-img): callers run it in worker threads.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from twarga_lab.db import Database
from twarga_lab.db.models import VM, VMStatus
from twarga_lab.errors import BackendError, QuotaExceeded
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.users import LIVE_STATUSES, lock_user
from twarga_lab.services.vms.quota import CreateRequest
from twarga_lab.virt.domain import (
    CONTROL_CHANNEL,
    SYSLOG_CHANNEL,
    ChannelSpec,
    DiskSpec,
    DomainSpec,
    SegmentNICSpec,
    UserNetSpec,
)
from twarga_lab.virt.host_images import ImageCopy
from twarga_lab.virt.hosts import DEFAULT_HOST, Host
from twarga_lab.virt.images import (
    FileOwner,
    Image,
    ImageStore,
    build_seed_iso,
    create_overlay,
    secure_instance_dir,
)
from twarga_lab.virt.seed import build_tiny_seed, generate_host_key, generate_password, sha512_crypt
from twarga_lab.virt.switch import MAX_FOLDER_BYTES, start_switch

if TYPE_CHECKING:
    from twarga_lab.services.hosts import HostService
    from twarga_lab.services.vms.settings import VMServiceConfig

log = logging.getLogger(__name__)

GUEST_IP = "10.0.2.15"  # QEMU user networking always leases this address to the guest
TINY_SEED = "twarga-seed.iso"  # kernel images' seed: root's keys and password hash
HOST_KEY_PUB = "ssh_host_ed25519_key.pub"  # the public half of the host key on the seed


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port`` (another program, or another Twarga)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class Provisioner:
    """Makes and checks the files and the domain definition of VMs."""

    def __init__(
        self,
        db: Database,
        images: ImageStore,
        config: VMServiceConfig,
        file_owner: FileOwner | None,
    ) -> None:
        self.db = db
        self.images = images
        self.config = config
        # Instance folders and files belong to the account libvirt runs QEMU as, 0700/0600.
        self.file_owner = file_owner
        self._switch_lock = threading.Lock()
        # Where new VMs go when there are several hypervisor hosts (the app sets it).
        self.hosts: HostService | None = None

    # -- the row ----------------------------------------------------------------------

    def new_vm(
        self,
        session: Session,
        user_id: int,
        request: CreateRequest,
        image: Image,
        host: str | None = None,
    ) -> VM:
        """Add a pending VM row for ``request`` with a free SSH port, its domain name and
        its host (``host``, else the one placement chooses); call under the owner's lock,
        after the quota checks."""
        # tiny's root, a cloud image's default user (its seed has only the hash)
        password = generate_password() if image.kind == "kernel" or image.cloud_init else None
        vm = VM(
            owner_id=user_id,
            name=request.name,
            image=request.image,
            os_type=image.os_type,
            ram_mb=request.ram,
            cpu=request.cpu,
            disk_gb=request.disk,
            status=VMStatus.pending,
            ssh_port=self.free_ssh_port(session),
            ip_address=GUEST_IP,
            root_password=password,
        )
        if host is None:
            host = self.hosts.choose(session, request.ram) if self.hosts else DEFAULT_HOST
        vm.host = host
        session.add(vm)
        session.flush()
        vm.domain_name = f"{self.config.domain_prefix}{vm.id}-{vm.name}"
        if self.hosts is not None:
            self.hosts.pool.assign(vm.domain_name, host)
        return vm

    def free_ssh_port(self, session: Session) -> int:
        """The lowest port of the range no live VM has and nothing listens on (409
        ``no_ports`` when there is none)."""
        # Ports of live VMs are taken; the partial unique index backs this up.
        used = set(
            session.scalars(
                select(VM.ssh_port).where(VM.status.in_(LIVE_STATUSES), VM.ssh_port.is_not(None))
            )
        )
        for port in range(self.config.ssh_port_min, self.config.ssh_port_max + 1):
            if port not in used and port_is_free(port):
                return port
        raise QuotaExceeded("no SSH port is free on this host", "no_ports")

    def claim_ssh_port(self, vm_id: int) -> str | None:
        """Before a start: if another program listens on the VM's SSH forward port (a
        local account could squat it while the VM is off and collect the owner's password
        with a fake SSH server), move the VM to a free port, record a security event and
        return a notice for the owner; None when the port is still the VM's."""
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            assert vm is not None
            old = vm.ssh_port
            if old is None or port_is_free(old):
                return None
            lock_user(session, vm.owner_id)
            new = self.free_ssh_port(session)
            vm.ssh_port = new
            notice = (
                f"SSH moved from port {old} (another program was listening there) to {new}; "
                "connect to the new port and check the VM's host key"
            )
            record_event(
                session, EventType.security, Severity.warning,
                f"SSH port {old} of VM {vm.name} was taken by another program; "
                f"the VM now forwards 127.0.0.1:{new}",
                user_name=vm.owner.name, vm_id=vm.id, action="ssh_port_moved",
                previous_port=old, port=new,
            )  # fmt: skip
            log.warning("VM %s: SSH port %s is taken, moved to %s", vm_id, old, new)
            return notice

    # -- the files --------------------------------------------------------------------

    def instance_dir(self, domain_name: str) -> Path:
        """Where a VM's disk, seed and console log live."""
        return self.config.instances_dir / domain_name

    def remove_files(self, domain_name: str) -> None:
        """Remove a VM's instance folder, if there is one."""
        shutil.rmtree(self.instance_dir(domain_name), True)

    # -- lab networks -------------------------------------------------------------------

    def lab_dir(self, lab_id: int) -> Path:
        """A lab's own files: the key its checks log in with."""
        return self.config.vms_dir / "labs" / str(lab_id)

    def switch_dir(self, network_id: int) -> Path:
        """The UNIX socket folder of a lab network's switch. Short on purpose: a socket's
        path may have 107 bytes at most, and ``vde_switch`` adds its own names below."""
        return self.config.vms_dir / "sw" / str(network_id)

    def lab_check_key(self, vm: VM) -> str | None:
        """The public key a lab's checks log in with (None for VMs outside labs)."""
        if vm.lab_id is None:
            return None
        try:
            return (self.lab_dir(vm.lab_id) / "check_key.pub").read_text().strip() or None
        except OSError:
            return None

    def segments(self, vm: VM) -> tuple[SegmentNICSpec, ...]:
        """The VM's ports on its lab's switches (PCI slots after the user-mode NIC's)."""
        if vm.lab_id is None:
            return ()
        return tuple(
            SegmentNICSpec(switch=self.switch_dir(nic.network_id), mac=nic.mac, pci_slot=10 + index)
            for index, nic in enumerate(vm.nics)
        )

    def ensure_switches(self, vm: VM) -> None:
        """Start the switch of every lab network the VM is on (each at most once)."""
        if not self.config.runs_guests or vm.lab_id is None:
            return  # libvirt's test driver runs no QEMU to plug into a switch
        # A lab's VMs are built in parallel threads: one start per switch at a time, or two
        # would clear each other's socket and pid file.
        with self._switch_lock:
            self._start_switches(vm)

    def _start_switches(self, vm: VM) -> None:
        for nic in vm.nics:
            folder = self.switch_dir(nic.network_id)
            if len(os.fsencode(str(folder))) > MAX_FOLDER_BYTES:
                raise BackendError(
                    f"the lab switch socket {folder} is too long for a UNIX socket: "
                    "choose a shorter vms_dir"
                )
            start_switch(folder, owner=self.file_owner)

    def host_image(self, vm: VM, image: Image) -> Image:
        """``image`` as the VM's host has it: the shared files, or (a host with storage of
        its own, ``TwargaLabApp.host_image_dirs``) its copy there, made on first use while
        the VM's status message shows the progress."""
        host = self._host_of(vm)
        if host is None or host.images is None:
            return image
        vm_id = vm.id
        return host.images.ensure(image, lambda copy: self._copy_progress(vm_id, copy))

    def host_domain_type(self, vm: VM) -> str:
        """``kvm`` or ``qemu`` for the VM's guest: its host's own type
        (``TwargaLabApp.host_domain_types``), else the app's, resolved on this machine."""
        host = self._host_of(vm)
        if host is not None and host.domain_type is not None:
            return host.domain_type
        return self.config.domain_type

    def _host_of(self, vm: VM) -> Host | None:
        """The host the VM is placed on; None before placement or without a host pool."""
        if self.hosts is None or vm.host is None:
            return None
        return self.hosts.pool.hosts.get(vm.host)

    def _copy_progress(self, vm_id: int, copy: ImageCopy) -> None:
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            if copy.state == "copying" and vm is not None and vm.status is VMStatus.pending:
                vm.status_message = (
                    f"copying image {copy.image} to host {copy.host}: {copy.percent:.0f}%"
                )
            elif copy.state == "ready":
                if vm is not None and vm.status is VMStatus.pending:
                    vm.status_message = None
                record_event(
                    session, EventType.system, Severity.info,
                    f"image {copy.image} copied to host {copy.host}: "
                    f"{copy.total_bytes / 2**20:.1f} MB in {copy.seconds} s",
                    action="image_copied", host=copy.host, image=copy.image,
                    bytes=copy.total_bytes, seconds=copy.seconds, vm_id_first=vm_id,
                )  # fmt: skip

    def domain_spec(self, vm: VM, owner: str, image: Image | None = None) -> DomainSpec:
        """The libvirt domain for a VM row (rebuilt at every start, so edits apply);
        ``image``: the VM's image as its host has it (looked up if not given)."""
        assert vm.domain_name is not None
        if image is None:
            image = self.host_image(vm, self.images.get(vm.image))
        folder = self.instance_dir(vm.domain_name)
        disks = [DiskSpec(path=folder / "disk.qcow2", target="vda")]
        if image.cloud_init:
            disks.append(
                DiskSpec(
                    path=folder / "seed.iso", target="hdc", format="raw", device="cdrom", bus="ide"
                )
            )
        cmdline: tuple[tuple[str, str], ...] = ()
        channels: tuple[ChannelSpec, ...] = ()
        if image.kind == "kernel":
            cmdline = (
                ("console", "ttyS0"),
                ("quiet", ""),
                ("twarga.name", vm.name),
                ("twarga.ssh", "1"),
            )
            disks.append(
                DiskSpec(path=folder / TINY_SEED, target="vdb", format="raw", readonly=True)
            )
            channels = (ChannelSpec(SYSLOG_CHANNEL),)  # libvirt picks the socket's path
            if vm.lab_id is not None and vm.nics:
                # Bans inside a lab are enforced by the guest: the service writes them here.
                channels = (*channels, ChannelSpec(CONTROL_CHANNEL))
        elif image.kernel is not None:
            cmdline = image.cmdline  # a disk image with its own kernel (debian/12)
        if image.cloud_init:
            channels = (ChannelSpec(SYSLOG_CHANNEL),)  # the seed's rsyslog writes into it
        return DomainSpec(
            name=vm.domain_name,
            memory_mib=vm.ram_mb,
            vcpus=vm.cpu,
            domain_type=self.host_domain_type(vm),
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=cmdline,
            disks=tuple(disks),
            console_log=folder / "console.log",
            network=UserNetSpec(ssh_host_port=vm.ssh_port),
            segments=self.segments(vm),
            channels=channels,
            owner=owner,
            vm_id=vm.id,
        )

    def prepare_disks(self, vm_id: int) -> DomainSpec:
        """Make whatever of the VM's disk and seeds is missing; returns its domain."""
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            assert vm is not None and vm.domain_name is not None
            owner = vm.owner
            image = self.host_image(vm, self.images.get(vm.image))
            spec = self.domain_spec(vm, owner.name, image)
            folder = self.instance_dir(vm.domain_name)
            if folder.is_dir():
                for partial in folder.glob(".*.tmp"):
                    partial.unlink()  # an interrupted write; the real file was never renamed
            disk = folder / "disk.qcow2"
            if not disk.exists():
                create_overlay(image.base_disk, disk, vm.disk_gb)
            if image.cloud_init and not (folder / "seed.iso").exists():
                build_seed_iso(
                    folder / "seed.iso",
                    instance_id=vm.domain_name,
                    hostname=vm.name,
                    ssh_keys=self.authorized_keys(vm),
                    user=image.default_user or "twarga",
                    password_hash=sha512_crypt(vm.root_password) if vm.root_password else None,
                    syslog_channel=SYSLOG_CHANNEL,
                    segments=self.segment_addresses(vm),
                )
            self.ensure_tiny_seed(vm, image)
            self.secure(folder)
            self.ensure_switches(vm)
            return spec

    def spec_for_start(self, vm_id: int) -> DomainSpec:
        """The domain of an existing VM with today's settings, after making what VMs older
        than Twarga's seeds and file rights lack."""
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            assert vm is not None
            spec = self.domain_spec(vm, vm.owner.name)
            self.ensure_tiny_seed(vm, self.images.get(vm.image))  # VMs older than seeds
            self.secure(self.instance_dir(spec.name))  # and VMs older than this check
            self.ensure_switches(vm)
            return spec

    def secure(self, folder: Path) -> None:
        """Only QEMU's account (and root) may read a VM's disk, seeds and console log."""
        instances = self.config.instances_dir
        instances.mkdir(parents=True, exist_ok=True)
        instances.chmod(0o711)  # others may pass through to their VMs' disks, not list them
        secure_instance_dir(folder, self.file_owner)

    def ensure_tiny_seed(self, vm: VM, image: Image) -> None:
        """A kernel image's seed disk: the owner's key, root's password hash (never the
        kernel command line, which anyone reading the domain XML sees) and the guest's SSH
        host key, whose public half is kept beside it for the owner."""
        assert vm.domain_name is not None
        folder = self.instance_dir(vm.domain_name)
        seed = folder / TINY_SEED
        if image.kind != "kernel" or seed.exists():
            return
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="twarga-hostkey-") as tmp:
            private = Path(tmp) / "host_key"
            public = generate_host_key(private)
            build_tiny_seed(
                seed,
                authorized_keys=self.authorized_keys(vm),
                root_password_hash=sha512_crypt(vm.root_password) if vm.root_password else None,
                host_key=private,
                segments=self.segment_addresses(vm),
            )
        partial = folder / f".{HOST_KEY_PUB}.tmp"
        partial.write_text(public + "\n")
        os.replace(partial, folder / HOST_KEY_PUB)

    def authorized_keys(self, vm: VM) -> list[str]:
        """The owner's key, and a lab VM's check key (the service's checks log in with it)."""
        keys = [vm.owner.ssh_public_key, self.lab_check_key(vm)]
        return [key for key in keys if key]

    @staticmethod
    def segment_addresses(vm: VM) -> list[tuple[str, str]]:
        """(MAC, address/prefix) of each of the VM's lab ports, for its seed."""
        if vm.lab_id is None:
            return []
        return [(nic.mac, f"{nic.address}/{nic.prefix}") for nic in vm.nics]

    def host_key(self, domain_name: str) -> str | None:
        """The public SSH host key of a kernel-image VM (None for VMs older than this)."""
        try:
            return (self.instance_dir(domain_name) / HOST_KEY_PUB).read_text().strip() or None
        except OSError:
            return None
