"""Domain XML built from objects.

Every value reaches the XML through ElementTree (which escapes it) after being checked
against what libvirt and QEMU accept, so a VM name like ``a</name><devices>`` can neither
break the document nor smuggle options onto QEMU's command line.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
TWARGA_NS = "https://twarga-lab.dev/xmlns/domain/1.0"

DOMAIN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Kernel command-line words: key=value with no spaces or quotes.
CMDLINE_KEY_RE = re.compile(r"^[a-z][a-z0-9_.]*$")
CMDLINE_VALUE_RE = re.compile(r"^[A-Za-z0-9_.,:/@+-]*$")
DISK_TARGET_RE = re.compile(r"^(vd|sd|hd)[a-z]$")
CHANNEL_NAME_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
#: The virtio-serial port the tiny image's syslogd writes into (see ``virt.tinyimage``).
SYSLOG_CHANNEL = "org.twarga.syslog.0"
#: The virtio-serial port the tiny image reads ``ban ADDR``/``unban ADDR`` lines from
#: (host -> guest; see ``virt.guest_control``).
CONTROL_CHANNEL = "org.twarga.control.0"
MAC_RE = re.compile(r"52:54:00(:[0-9a-f]{2}){3}")
#: The MAC QEMU gives the user-network NIC (the first NIC without an explicit MAC; segment
#: NICs always have one, never this one).
USER_NET_MAC = "52:54:00:12:34:56"
DOMAIN_TYPES = ("qemu", "kvm", "test")
#: Names of Twarga's metadata attributes (XML names without a namespace prefix).
METADATA_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
# What XML 1.0 cannot carry (C0 controls but tab, LF and CR; U+FFFE, U+FFFF; surrogates,
# which also never encode to UTF-8 for libvirt), and CR, which a parser reads back as LF.
_NOT_XML_TEXT = re.compile("[\x00-\x08\x0b-\x1f\ud800-\udfff\ufffe\uffff]")

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("twarga", TWARGA_NS)


@dataclass(frozen=True)
class DiskSpec:
    """A disk or CD-ROM attached to the guest."""

    path: Path
    target: str = "vda"
    format: str = "qcow2"
    device: str = "disk"  # disk or cdrom
    bus: str = "virtio"
    readonly: bool = False

    def __post_init__(self) -> None:
        check_xml_text(self.path, "disk path")
        if not DISK_TARGET_RE.fullmatch(self.target):
            raise ValueError(f"bad disk target {self.target!r}")
        if self.device not in ("disk", "cdrom"):
            raise ValueError(f"bad disk device {self.device!r}")
        if self.format not in ("qcow2", "raw"):
            raise ValueError(f"bad disk format {self.format!r}")
        if self.bus not in ("virtio", "sata", "scsi", "ide"):
            raise ValueError(f"bad disk bus {self.bus!r}")


@dataclass(frozen=True)
class ChannelSpec:
    """A virtio-serial port whose host end is a UNIX socket QEMU listens on.

    Without ``path`` libvirt picks one under ``/var/lib/libvirt/qemu/channel/target/``; it
    shows in the live XML only (:func:`channel_socket_path`).
    """

    name: str  # the port's name in the guest (/sys/class/virtio-ports/*/name)
    path: Path | None = None

    def __post_init__(self) -> None:
        if not CHANNEL_NAME_RE.fullmatch(self.name):
            raise ValueError(f"bad channel name {self.name!r}")
        if self.path is not None:
            check_xml_text(self.path, "channel socket path")


@dataclass(frozen=True)
class UserNetSpec:
    """QEMU user-mode networking (slirp) with the guest's SSH forwarded to loopback.

    ``restrict`` keeps the guest from reaching anything but the explicit forwards.
    """

    ssh_host_port: int | None = None
    restrict: bool = True
    pci_slot: int = 9  # slot 2 is libvirt's balloon; 9 is free on the pc machine

    def __post_init__(self) -> None:
        if self.ssh_host_port is not None and not 1024 <= self.ssh_host_port <= 65535:
            raise ValueError(f"bad SSH forward port {self.ssh_host_port!r}")
        if not 3 <= self.pci_slot <= 31:
            raise ValueError(f"bad PCI slot {self.pci_slot!r}")

    def qemu_args(self) -> list[str]:
        """The QEMU arguments for this NIC, each a separate argv word."""
        netdev = ["user", "id=twarganet0", f"restrict={'on' if self.restrict else 'off'}"]
        if self.ssh_host_port is not None:
            netdev.append(f"hostfwd=tcp:127.0.0.1:{self.ssh_host_port}-:22")
        device = f"virtio-net-pci,netdev=twarganet0,bus=pci.0,addr={self.pci_slot:#x}"
        return ["-netdev", ",".join(netdev), "-device", device]


@dataclass(frozen=True)
class SegmentNICSpec:
    """A NIC on a lab's private segment: QEMU's ``vde`` netdev plugged into the switch
    whose socket folder is ``switch`` (``virt.switch``); no host tap, no bridge."""

    switch: Path
    mac: str
    pci_slot: int

    def __post_init__(self) -> None:
        text = str(self.switch)
        # A comma would start another QEMU option; the folder is one argv word's value.
        if not Path(self.switch).is_absolute() or any(c in text for c in ",\x00\n\r"):
            raise ValueError(f"bad switch socket folder {text!r}")
        check_xml_text(text, "switch socket folder")
        if (
            not isinstance(self.mac, str)
            or not MAC_RE.fullmatch(self.mac)
            or (self.mac == USER_NET_MAC)
        ):
            raise ValueError(f"bad MAC address {self.mac!r} (52:54:00:xx:xx:xx, lower case)")
        if not isinstance(self.pci_slot, int) or not 3 <= self.pci_slot <= 31:
            raise ValueError(f"bad PCI slot {self.pci_slot!r}")

    def qemu_args(self, index: int) -> list[str]:
        """The QEMU arguments for this NIC (netdev ``twargaseg{index}``), one argv word each."""
        netdev = f"twargaseg{index}"
        return [
            "-netdev", f"vde,id={netdev},sock={self.switch}",
            "-device",
            f"virtio-net-pci,netdev={netdev},mac={self.mac},bus=pci.0,addr={self.pci_slot:#x}",
        ]  # fmt: skip


def segment_nics(switches: list[Path] | tuple[Path, ...], macs: list[str] | tuple[str, ...],
                 first_slot: int = 10) -> tuple[SegmentNICSpec, ...]:  # fmt: skip
    """Segment NICs for ``switches`` with ``macs``, in PCI slots from ``first_slot`` on
    (after the user-network NIC's slot 9)."""
    if len(switches) != len(macs):
        raise ValueError("one MAC address per segment")
    return tuple(
        SegmentNICSpec(Path(sw), mac, first_slot + i)
        for i, (sw, mac) in enumerate(zip(switches, macs, strict=True))
    )


@dataclass(frozen=True)
class DomainSpec:
    """Everything libvirt needs to define one guest."""

    name: str
    memory_mib: int
    vcpus: int
    domain_type: str = "qemu"
    uuid: str | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: tuple[tuple[str, str], ...] = ()
    disks: tuple[DiskSpec, ...] = ()
    console_log: Path | None = None
    network: UserNetSpec | None = None
    channels: tuple[ChannelSpec, ...] = ()
    segments: tuple[SegmentNICSpec, ...] = ()
    owner: str | None = None
    vm_id: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not DOMAIN_NAME_RE.fullmatch(self.name):
            raise ValueError(f"bad domain name {self.name!r}")
        if self.domain_type not in DOMAIN_TYPES:
            raise ValueError(f"bad domain type {self.domain_type!r}")
        if not 64 <= self.memory_mib <= 1024 * 1024:
            raise ValueError(f"bad memory size {self.memory_mib!r}")
        if not 1 <= self.vcpus <= 256:
            raise ValueError(f"bad vCPU count {self.vcpus!r}")
        if self.initrd is not None and self.kernel is None:
            raise ValueError("an initrd needs a kernel")
        for what, value in (("UUID", self.uuid), ("kernel", self.kernel),
                            ("initrd", self.initrd), ("console log", self.console_log),
                            ("owner", self.owner)):  # fmt: skip
            if value is not None:
                check_xml_text(value, what)
        for key, value in self.metadata.items():
            # A key is an attribute's name: ``a="1" b`` would add an attribute of its own.
            if not isinstance(key, str) or not METADATA_KEY_RE.fullmatch(key):
                raise ValueError(f"bad metadata key {key!r}")
            if not isinstance(value, str):
                raise ValueError(f"bad metadata value {value!r} of {key!r}: text only")
            check_xml_text(value, f"metadata value of {key!r}")
        for key, value in self.cmdline:
            if not CMDLINE_KEY_RE.fullmatch(key) or not CMDLINE_VALUE_RE.fullmatch(value):
                raise ValueError(f"bad kernel argument {key!r}={value!r}")
        targets = [d.target for d in self.disks]
        if len(set(targets)) != len(targets):
            raise ValueError("two disks share a target")
        slots = [s.pci_slot for s in self.segments]
        if self.network is not None:
            slots.append(self.network.pci_slot)
        if len(set(slots)) != len(slots) or 2 in slots:
            raise ValueError("two NICs share a PCI slot (or take the balloon's slot 2)")
        macs = [s.mac for s in self.segments]
        if len(set(macs)) != len(macs):
            raise ValueError("two segment NICs share a MAC address")

    def kernel_cmdline(self) -> str:
        """The kernel command line, ``key=value`` words joined by spaces."""
        return " ".join(f"{k}={v}" if v else k for k, v in self.cmdline)


def check_xml_text(value: object, what: str) -> None:
    """ValueError unless ``value`` (a path or text) reaches the XML and back unchanged."""
    if _NOT_XML_TEXT.search(str(value)):
        raise ValueError(f"bad {what} {str(value)!r}: control characters are refused")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def build_domain_element(spec: DomainSpec) -> ET.Element:
    """The ``<domain>`` element for ``spec``."""
    domain = ET.Element("domain", {"type": spec.domain_type})
    _sub(domain, "name", spec.name)
    if spec.uuid:
        _sub(domain, "uuid", spec.uuid)
    if spec.owner is not None or spec.vm_id is not None or spec.metadata:
        metadata = _sub(domain, "metadata")
        attrs = dict(spec.metadata)
        if spec.owner is not None:
            attrs["owner"] = spec.owner
        if spec.vm_id is not None:
            attrs["id"] = str(spec.vm_id)
        _sub(metadata, f"{{{TWARGA_NS}}}vm", **dict(sorted(attrs.items())))
    _sub(domain, "memory", str(spec.memory_mib), unit="MiB")
    _sub(domain, "currentMemory", str(spec.memory_mib), unit="MiB")
    _sub(domain, "vcpu", str(spec.vcpus), placement="static")

    os_el = _sub(domain, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    if spec.kernel is not None:
        _sub(os_el, "kernel", str(spec.kernel))
        if spec.initrd is not None:
            _sub(os_el, "initrd", str(spec.initrd))
        if spec.cmdline:
            _sub(os_el, "cmdline", spec.kernel_cmdline())
    else:
        _sub(os_el, "boot", dev="hd")

    features = _sub(domain, "features")
    _sub(features, "acpi")  # graceful shutdown is an ACPI power-button press
    _sub(features, "apic")
    _sub(domain, "clock", offset="utc")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")

    devices = _sub(domain, "devices")
    for disk in spec.disks:
        disk_el = _sub(devices, "disk", type="file", device=disk.device)
        _sub(disk_el, "driver", name="qemu", type=disk.format)
        _sub(disk_el, "source", file=str(disk.path))
        _sub(disk_el, "target", dev=disk.target, bus=disk.bus)
        if disk.readonly or disk.device == "cdrom":
            _sub(disk_el, "readonly")

    serial = _sub(devices, "serial", type="pty")
    if spec.console_log is not None:
        _sub(serial, "log", file=str(spec.console_log), append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    for channel in spec.channels:
        channel_el = _sub(devices, "channel", type="unix")
        source = {"path": str(channel.path)} if channel.path is not None else {}
        _sub(channel_el, "source", mode="bind", **source)
        _sub(channel_el, "target", type="virtio", name=channel.name)
    _sub(devices, "memballoon", model="virtio")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")

    args: list[str] = spec.network.qemu_args() if spec.network is not None else []
    for index, nic in enumerate(spec.segments):
        args += nic.qemu_args(index)
    if args:
        commandline = _sub(domain, f"{{{QEMU_NS}}}commandline")
        for arg in args:
            _sub(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    return domain


def build_domain_xml(spec: DomainSpec) -> str:
    """The domain XML for ``spec`` as a string (indented, stable for golden files)."""
    element = build_domain_element(spec)
    ET.indent(element)
    return ET.tostring(element, encoding="unicode") + "\n"


def channel_socket_path(xml: str, name: str) -> str | None:
    """The host socket of the virtio channel ``name`` in a (live) domain XML, if any."""
    for channel in ET.fromstring(xml).iterfind("devices/channel"):
        target = channel.find("target")
        source = channel.find("source")
        if target is not None and target.get("name") == name and source is not None:
            return source.get("path")
    return None


def read_twarga_metadata(xml: str) -> dict[str, str]:
    """Twarga's metadata attributes (owner, id) from a domain's XML, or {}."""
    root = ET.fromstring(xml)
    element = root.find(f"metadata/{{{TWARGA_NS}}}vm")
    return dict(element.attrib) if element is not None else {}
