"""Two tiny guests on one private lab segment (a ``vde_switch`` on a UNIX socket folder),
defined on qemu:///system with libvirt-python from our own DomainSpec.

What a user would notice: A pings B's segment address; the host gains no interface and no
route; the switch's socket folder is the only thing the two QEMU processes share; a ``ban``
pushed into B's control channel is logged on B's syslog channel and refuses A's next SSH
connection at once, while the owner's SSH forward to B on 127.0.0.1 still answers.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers import free_port
from twarga_lab.errors import NotFound
from twarga_lab.virt.domain import (
    CONTROL_CHANNEL,
    SYSLOG_CHANNEL,
    ChannelSpec,
    DiskSpec,
    DomainSpec,
    SegmentNICSpec,
    UserNetSpec,
    build_domain_xml,
    channel_socket_path,
)
from twarga_lab.virt.guest_control import send_control_line
from twarga_lab.virt.images import (
    ImageStore,
    build_seed_iso,
    create_overlay,
    qemu_account,
    secure_instance_dir,
)
from twarga_lab.virt.seed import build_tiny_seed, generate_password, sha512_crypt
from twarga_lab.virt.switch import start_switch, stop_switch, switch_pid, switch_running

libvirt = pytest.importorskip("libvirt")
pytestmark = pytest.mark.real

BOOT_TIMEOUT = 180.0  # two TCG guests on a loaded machine
SEGMENT = "10.77.0."


def _host_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return sorted(line.split(":")[1].strip() for line in out.stdout.splitlines())


class ChannelReader:
    """Everything a guest writes into a virtio-serial channel, read from its UNIX socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            with self._lock:
                self.text += chunk.decode("utf-8", "replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            assert time.monotonic() < deadline, f"no {needle!r}; channel tail: {self.text[-1500:]}"
            time.sleep(0.1)

    def close(self) -> None:
        self.sock.close()


@dataclass
class LabGuest:
    name: str
    domain: str
    address: str
    mac: str
    ssh_port: int
    console: Path
    dom: object = None

    def ssh(self, key: Path, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``command`` in the guest, through its SSH forward on 127.0.0.1."""
        return subprocess.run(
            ["ssh", "-i", str(key), "-p", str(self.ssh_port), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "root@127.0.0.1", command],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip


@dataclass
class Lab:
    work: Path
    switch: Path
    key: Path
    password: str
    a: LabGuest
    b: LabGuest


def _qemu_cmdline(domain: str) -> tuple[int, list[str]]:
    needle = f"guest={domain},".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in raw and needle in raw:
            return int(entry.name), [a.decode() for a in raw.split(b"\0") if a]
    raise AssertionError(f"no QEMU process for {domain}")


def _wait_ssh(guest: LabGuest, key: Path, deadline: float) -> None:
    while True:
        done = guest.ssh(key, "true", timeout=30)
        if done.returncode == 0:
            return
        console = guest.console.read_text(errors="replace") if guest.console.exists() else ""
        assert time.monotonic() < deadline, f"{guest.name} SSH: {done.stderr}\n{console[-2000:]}"
        time.sleep(1)


@pytest.fixture(scope="module")
def host_links_before() -> list[str]:
    return _host_links()


@pytest.fixture(scope="module")
def lab(host_links_before: list[str]) -> Iterator[Lab]:
    image = REPO / "vms" / "images" / "twarga" / "tiny"
    if not (image / "image.json").exists():
        pytest.fail(f"no twarga/tiny under {image}: run `make image`")
    tag = secrets.token_hex(3)
    work = REPO / "vms" / "test-runs" / f"labnet-{tag}"
    work.mkdir(parents=True)
    for folder in (work, work.parent):
        folder.chmod(0o755)
    owner = qemu_account()
    conn = libvirt.open("qemu:///system")
    switch = work / "segments" / "lan"
    guests: list[LabGuest] = []
    try:
        start_switch(switch, owner=owner)
        key = work / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True, timeout=30)  # fmt: skip
        password = generate_password()
        for name, host in (("a", 11), ("b", 12)):
            folder = work / name
            folder.mkdir()
            disk = folder / "disk.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"],
                           check=True, timeout=30)  # fmt: skip
            mac = f"52:54:00:4d:00:{host:02x}"
            seed = build_tiny_seed(
                folder / "seed.iso",
                authorized_keys=[key.with_suffix(".pub").read_text()],
                root_password_hash=sha512_crypt(password),
                segments=[(mac, f"{SEGMENT}{host}/24")],
            )
            guest = LabGuest(f"lab-{name}", f"twlnet{tag}-{name}", f"{SEGMENT}{host}", mac,
                             free_port(), folder / "console.log")  # fmt: skip
            spec = DomainSpec(
                name=guest.domain,
                memory_mib=192,
                vcpus=1,
                domain_type="qemu",
                kernel=image / "vmlinuz",
                initrd=image / "initrd.img",
                cmdline=(("console", "ttyS0"), ("twarga.name", guest.name), ("twarga.ssh", "1")),
                disks=(
                    DiskSpec(disk),
                    DiskSpec(seed, target="vdb", format="raw", readonly=True),
                ),
                console_log=guest.console,
                network=UserNetSpec(ssh_host_port=guest.ssh_port),
                channels=(ChannelSpec(SYSLOG_CHANNEL), ChannelSpec(CONTROL_CHANNEL)),
                segments=(SegmentNICSpec(switch, mac, 10),),
            )
            secure_instance_dir(folder, owner)
            guest.dom = conn.defineXML(build_domain_xml(spec))
            guests.append(guest)
        for guest in guests:
            guest.dom.create()  # type: ignore[attr-defined]
        deadline = time.monotonic() + BOOT_TIMEOUT
        for guest in guests:
            _wait_ssh(guest, key, deadline)
        yield Lab(work, switch, key, password, guests[0], guests[1])
    finally:
        for guest in guests:
            for call in ("destroy", "undefine"):
                with contextlib.suppress(libvirt.libvirtError):  # not running, or gone
                    getattr(guest.dom, call)()
        stop_switch(switch)
        conn.close()
        artifacts = REPO / "test-artifacts" / "lab-network"
        artifacts.mkdir(parents=True, exist_ok=True)
        for guest in guests:
            if guest.console.exists():
                shutil.copy(guest.console, artifacts / f"{guest.name}-console.log")
        shutil.rmtree(work, ignore_errors=True)


def test_switch_is_private_and_idempotent(lab: Lab) -> None:
    owner = qemu_account()
    pid = switch_pid(lab.switch)
    assert pid is not None and switch_running(lab.switch)
    assert start_switch(lab.switch, owner=owner) == pid  # found again, not a second switch
    info = lab.switch.stat()
    assert info.st_mode & 0o777 == 0o700
    if owner is not None:
        assert info.st_uid == owner.uid
        assert Path(f"/proc/{pid}").stat().st_uid == owner.uid  # the switch is not root
    assert (lab.switch / "ctl").is_socket()


def test_a_pings_b_over_the_segment_and_the_host_sees_nothing(
    lab: Lab, host_links_before: list[str]
) -> None:
    shown = lab.a.ssh(lab.key, "ip -o addr show; ip route")
    assert f"inet {lab.a.address}/24" in shown.stdout, shown
    ping = lab.a.ssh(lab.key, f"ping -c 3 -W 2 {lab.b.address}")
    assert ping.returncode == 0 and re.search(r"[1-3] packets received", ping.stdout), ping

    assert _host_links() == host_links_before  # no bridge, no tap, no new interface
    routes = subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert SEGMENT not in routes
    assert SEGMENT not in subprocess.run(["ip", "-o", "addr"], capture_output=True,
                                         text=True, check=True).stdout  # fmt: skip

    # Each QEMU has its own user network (restricted, its own forward) and one vde NIC on
    # the switch folder: that folder is the only network path they share.
    netdevs = []
    for guest in (lab.a, lab.b):
        _, argv = _qemu_cmdline(guest.domain)
        ours = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-netdev"]
        ours = [n for n in ours if n.startswith(("user,", "vde,"))]
        assert ours[1] == f"vde,id=twargaseg0,sock={lab.switch}", ours
        assert ours[0].startswith("user,id=twarganet0,restrict=on,"), ours
        assert f"hostfwd=tcp:127.0.0.1:{guest.ssh_port}-:22" in ours[0]
        assert not any("tap" in a or "bridge" in a for a in argv)
        netdevs.append(set(ours))
    assert netdevs[0] & netdevs[1] == {f"vde,id=twargaseg0,sock={lab.switch}"}


def test_ban_in_b_refuses_a_and_keeps_the_owner_forward(lab: Lab) -> None:
    ssh_b = (
        f"DROPBEAR_PASSWORD='{lab.password}' timeout 30 dbclient -y -y "
        f"root@{lab.b.address} echo hello-from-b"
    )
    xml = lab.b.dom.XMLDesc()  # type: ignore[attr-defined]
    syslog_path, control_path = (
        channel_socket_path(xml, n) for n in (SYSLOG_CHANNEL, CONTROL_CHANNEL)
    )
    assert syslog_path and control_path
    syslog = ChannelReader(syslog_path)
    try:
        before = lab.a.ssh(lab.key, ssh_b)
        assert "hello-from-b" in before.stdout, before  # A really SSHes to B with a password
        # A wrong password shows on B's syslog channel with A's real segment address.
        wrong = ssh_b.replace(lab.password, "not-the-password")
        assert "hello-from-b" not in lab.a.ssh(lab.key, wrong).stdout
        syslog.wait_for(f"Bad password attempt for 'root' from {lab.a.address}:", timeout=30)

        started = time.monotonic()
        send_control_line(control_path, f"ban {lab.a.address}", timeout=30)
        print(f"\nban acknowledged in {time.monotonic() - started:.2f}s")
        syslog.wait_for(f"twarga-guard: banned {lab.a.address}", timeout=15)

        timed = f"s=$(date +%s); {ssh_b}; echo rc=$? took=$(( $(date +%s) - s ))"
        after = lab.a.ssh(lab.key, timed)
        assert "hello-from-b" not in after.stdout, after
        rc, took = re.search(r"rc=(\d+) took=(\d+)", after.stdout).groups()  # type: ignore[union-attr]
        print(f"A -> B:22 after the ban: rc={rc} in {took}s; {after.stderr.strip()[-200:]}")
        assert rc != "0" and int(took) <= 8, after

        rules = lab.b.ssh(lab.key, "ip rule")
        assert re.search(rf"from {re.escape(lab.a.address)}\b.*prohibit", rules.stdout), rules
        with socket.create_connection(("127.0.0.1", lab.b.ssh_port), timeout=20) as sock:
            sock.settimeout(20)
            assert sock.recv(64).startswith(b"SSH-2.0-")  # the owner's forward still answers
        assert lab.b.ssh(lab.key, "echo owner-ok").stdout.strip() == "owner-ok"

        send_control_line(control_path, f"unban {lab.a.address}", timeout=30)
        syslog.wait_for(f"twarga-guard: unbanned {lab.a.address}", timeout=15)
        again = lab.a.ssh(lab.key, ssh_b)
        assert "hello-from-b" in again.stdout, again
    finally:
        syslog.close()


def test_switch_stops_and_its_folder_goes() -> None:
    folder = REPO / "vms" / "test-runs" / f"labsw-{secrets.token_hex(3)}" / "seg"
    try:
        pid = start_switch(folder, owner=qemu_account())
        assert switch_running(folder)
        stop_switch(folder)
        assert not folder.exists() and not switch_running(folder)
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    finally:
        stop_switch(folder)
        shutil.rmtree(folder.parent, ignore_errors=True)


#: debian/12 under TCG: about a minute to sshd on an idle machine, several when loaded.
DEBIAN_SSH_DEADLINE = 600.0


@pytest.mark.timeout(1200)
def test_a_debian_guest_gets_its_segment_address_from_its_seed(
    lab: Lab, host_links_before: list[str]
) -> None:
    """debian/12 on the same segment as the tiny guests: cloud-init's seed gives its
    segment NIC (matched by MAC) its address; the user network keeps DHCP and the owner's
    forward; tiny A pings it."""
    store = ImageStore(REPO / "vms" / "images")
    try:
        image = store.get("debian/12")
    except NotFound:
        pytest.skip("no debian/12 image: run `make image-debian`")
    owner = qemu_account()
    folder = lab.work / "d"
    folder.mkdir()
    create_overlay(image.base_disk, folder / "disk.qcow2", image.min_disk_gb)
    mac, address = "52:54:00:4d:00:0d", f"{SEGMENT}13"
    build_seed_iso(
        folder / "seed.iso",
        instance_id=f"labnet-{lab.work.name}-d",
        hostname="lab-d",
        ssh_keys=[lab.key.with_suffix(".pub").read_text().strip()],
        user=image.default_user or "twarga",
        syslog_channel=SYSLOG_CHANNEL,
        segments=[(mac, f"{address}/24")],
    )
    port = free_port()
    spec = DomainSpec(
        name=f"twlnet{lab.work.name.removeprefix('labnet-')}-d",
        memory_mib=1024,
        vcpus=1,
        domain_type="qemu",
        kernel=image.kernel,
        initrd=image.initrd,
        cmdline=image.cmdline,
        disks=(
            DiskSpec(folder / "disk.qcow2"),
            DiskSpec(folder / "seed.iso", target="hdc", format="raw", device="cdrom", bus="ide"),
        ),
        console_log=folder / "console.log",
        network=UserNetSpec(ssh_host_port=port),
        channels=(ChannelSpec(SYSLOG_CHANNEL),),
        segments=(SegmentNICSpec(lab.switch, mac, 10),),
    )
    secure_instance_dir(folder, owner)
    conn = libvirt.open("qemu:///system")
    dom = conn.defineXML(build_domain_xml(spec))
    try:
        dom.create()
        user = image.default_user or "twarga"
        argv = ["ssh", "-i", str(lab.key), "-p", str(port), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", f"{user}@127.0.0.1"]  # fmt: skip
        started = time.monotonic()
        deadline = started + DEBIAN_SSH_DEADLINE
        while True:
            shown = subprocess.run([*argv, "ip -o addr show"], capture_output=True, text=True,
                                   timeout=60)  # fmt: skip
            if shown.returncode == 0 and f"inet {address}/24" in shown.stdout:
                break
            console = (folder / "console.log").read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, f"{shown}\n{console}"
            time.sleep(3)
        print(f"\ndebian/12 had its segment address {time.monotonic() - started:.0f}s after start")
        assert re.search(r"inet 10\.0\.2\.\d+/24", shown.stdout), shown.stdout  # DHCP kept
        ping = lab.a.ssh(lab.key, f"ping -c 3 -W 2 {address}")
        assert ping.returncode == 0 and re.search(r"[1-3] packets received", ping.stdout), ping
        # debian/12 has no ping: it reads tiny B's SSH banner over the segment.
        banner = f"timeout 20 bash -c 'exec 3<>/dev/tcp/{lab.b.address}/22; head -c 8 <&3'"
        while True:
            back = subprocess.run([*argv, banner], capture_output=True, text=True, timeout=60)
            # 255: ssh itself failed (cloud-init may still restart the guest's sshd).
            if back.returncode != 255 or time.monotonic() >= deadline:
                break
            time.sleep(3)
        assert back.stdout == "SSH-2.0-", back
        assert _host_links() == host_links_before
    finally:
        for call in ("destroy", "undefine"):
            with contextlib.suppress(libvirt.libvirtError):
                getattr(dom, call)()
        conn.close()
        artifacts = REPO / "test-artifacts" / "lab-network"
        artifacts.mkdir(parents=True, exist_ok=True)
        if (folder / "console.log").exists():
            shutil.copy(folder / "console.log", artifacts / "lab-d-console.log")
