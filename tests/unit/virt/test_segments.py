"""Lab segments on the host and guest side, without booting anything: segment NICs in the
domain XML, the seeds' network files, the control-channel client against a fake guest,
the guest scripts' address checks run by busybox, and a real ``vde_switch``."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from twarga_lab.errors import BackendError
from twarga_lab.virt.domain import (
    CONTROL_CHANNEL,
    QEMU_NS,
    USER_NET_MAC,
    ChannelSpec,
    DomainSpec,
    SegmentNICSpec,
    UserNetSpec,
    build_domain_xml,
    segment_nics,
)
from twarga_lab.virt.guest_control import ControlTimeout, send_control_line
from twarga_lab.virt.images import build_seed_iso
from twarga_lab.virt.seed import SEGMENT_BOOTCMD, build_tiny_seed, network_file
from twarga_lab.virt.switch import start_switch, stop_switch, switch_pid, switch_running
from twarga_lab.virt.tinyimage import GUARD_SCRIPT, INIT_SCRIPT

SWITCH = Path("/srv/labs/3/lan")


def qemu_args(xml: str) -> list[str]:
    root = ET.fromstring(xml)
    return [a.get("value", "") for a in root.iter(f"{{{QEMU_NS}}}arg")]


def spec(**extra: object) -> DomainSpec:
    return DomainSpec(name="lab-a", memory_mib=128, vcpus=1, **extra)  # type: ignore[arg-type]


# --- the domain -----------------------------------------------------------------------------


def test_segment_nics_follow_the_user_network_nic_on_the_command_line():
    nics = segment_nics(
        [SWITCH, Path("/srv/labs/3/dmz")], ["52:54:00:0a:00:0b", "52:54:00:0a:01:0b"]
    )
    xml = build_domain_xml(spec(network=UserNetSpec(ssh_host_port=22001), segments=nics))
    args = qemu_args(xml)
    assert args[:4] == [
        "-netdev", "user,id=twarganet0,restrict=on,hostfwd=tcp:127.0.0.1:22001-:22",
        "-device", "virtio-net-pci,netdev=twarganet0,bus=pci.0,addr=0x9",
    ]  # fmt: skip
    assert args[4:] == [
        "-netdev", "vde,id=twargaseg0,sock=/srv/labs/3/lan",
        "-device", "virtio-net-pci,netdev=twargaseg0,mac=52:54:00:0a:00:0b,bus=pci.0,addr=0xa",
        "-netdev", "vde,id=twargaseg1,sock=/srv/labs/3/dmz",
        "-device", "virtio-net-pci,netdev=twargaseg1,mac=52:54:00:0a:01:0b,bus=pci.0,addr=0xb",
    ]  # fmt: skip
    assert "tap" not in xml and "bridge" not in xml and "<interface" not in xml
    libvirt.open("test:///default").defineXML(xml.replace('type="qemu"', 'type="test"', 1))


def test_a_domain_without_segments_is_unchanged():
    net = UserNetSpec(ssh_host_port=22001)
    assert build_domain_xml(spec(network=net)) == build_domain_xml(spec(network=net, segments=()))
    assert "twargaseg" not in build_domain_xml(spec(network=net))
    assert f"{{{QEMU_NS}}}commandline" not in build_domain_xml(spec())  # nothing added at all
    assert "qemu:commandline" not in build_domain_xml(spec())


def test_segments_alone_get_a_command_line_and_the_control_channel_is_a_port():
    xml = build_domain_xml(
        spec(
            segments=(SegmentNICSpec(SWITCH, "52:54:00:00:00:01", 10),),
            channels=(ChannelSpec(CONTROL_CHANNEL),),
        )
    )
    assert qemu_args(xml)[1] == "vde,id=twargaseg0,sock=/srv/labs/3/lan"
    assert 'name="org.twarga.control.0"' in xml and 'mode="bind"' in xml


@pytest.mark.parametrize(
    ("switch", "mac", "slot"),
    [
        (Path("relative/lan"), "52:54:00:00:00:01", 10),
        (Path("/srv/a,b"), "52:54:00:00:00:01", 10),  # would add a QEMU option
        (Path("/srv/lan,script=/bin/sh"), "52:54:00:00:00:01", 10),
        (Path("/srv/a\nb"), "52:54:00:00:00:01", 10),
        (SWITCH, "52:54:00:AA:00:01", 10),  # upper case
        (SWITCH, "02:00:00:00:00:01", 10),
        (SWITCH, "52:54:00:00:00:01,addr=0x3", 10),
        (SWITCH, USER_NET_MAC, 10),  # the user network NIC's own MAC
        (SWITCH, "52:54:00:00:00:01", 2),
        (SWITCH, "52:54:00:00:00:01", 32),
    ],
)
def test_bad_segment_nics_are_refused(switch, mac, slot):
    with pytest.raises(ValueError):
        SegmentNICSpec(switch, mac, slot)


def test_nics_cannot_share_a_slot_or_a_mac():
    with pytest.raises(ValueError, match="PCI slot"):
        spec(network=UserNetSpec(), segments=(SegmentNICSpec(SWITCH, "52:54:00:00:00:01", 9),))
    with pytest.raises(ValueError, match="MAC"):
        spec(segments=segment_nics([SWITCH, SWITCH], ["52:54:00:00:00:01"] * 2))
    with pytest.raises(ValueError):
        segment_nics([SWITCH], [])


# --- the seeds ------------------------------------------------------------------------------


def iso_file(iso: Path, name: str) -> str:
    return subprocess.run(
        ["isoinfo", "-R", "-i", str(iso), "-x", f"/{name}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def iso_names(iso: Path) -> list[str]:
    out = subprocess.run(["isoinfo", "-R", "-f", "-i", str(iso)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return out.split()


def test_tiny_seed_has_one_network_line_per_segment(tmp_path):
    segments = [("52:54:00:0a:00:0b", "10.77.0.11/24"), ("52:54:00:0a:01:0b", "10.78.0.11/16")]
    seed = build_tiny_seed(tmp_path / "s.iso", authorized_keys=[], root_password_hash=None,
                           segments=segments)  # fmt: skip
    assert (
        iso_file(seed, "network")
        == "52:54:00:0a:00:0b 10.77.0.11/24\n52:54:00:0a:01:0b 10.78.0.11/16\n"
    )
    plain = build_tiny_seed(tmp_path / "p.iso", authorized_keys=[], root_password_hash=None)
    assert "/network" not in iso_names(plain)


@pytest.mark.parametrize(
    ("mac", "address"),
    [
        ("52:54:00:0a:00:0b", "10.77.0.11"),  # no prefix
        ("52:54:00:0a:00:0b", "10.77.0.0/24"),  # the network's address
        ("52:54:00:0a:00:0b", "10.77.0.255/24"),  # its broadcast
        ("52:54:00:0a:00:0b", "10.77.0.1/31"),
        ("52:54:00:0a:00:0b", "10.77.0.11/24\nrm -rf /"),
        ("52:54:00:0a:00:0b", "fd00::1/64"),
        ("52:54:00:0A:00:0B", "10.77.0.11/24"),
        ("52:54:00:0a:00:0b 10.1.1.1/8", "10.77.0.11/24"),
        (USER_NET_MAC, "10.77.0.11/24"),
    ],
)
def test_bad_network_lines_are_refused(mac, address):
    with pytest.raises(ValueError):
        network_file([(mac, address)])


def test_two_lines_cannot_share_a_mac():
    with pytest.raises(ValueError):
        network_file([("52:54:00:0a:00:0b", "10.77.0.11/24")] * 2)


def test_debian_seed_keeps_dhcp_on_the_user_network_and_sets_segment_addresses(tmp_path):
    seed = build_seed_iso(tmp_path / "seed.iso", instance_id="i-1", hostname="web", ssh_keys=[],
                          segments=[("52:54:00:0a:00:0c", "10.77.0.12/24")])  # fmt: skip
    config = json.loads(iso_file(seed, "network-config"))
    assert config == {
        "version": 2,
        "ethernets": {
            "usernet": {"match": {"macaddress": USER_NET_MAC}, "dhcp4": True},
            "twargaseg0": {
                "match": {"macaddress": "52:54:00:0a:00:0c"},
                "dhcp4": False,
                "dhcp6": False,
                "addresses": ["10.77.0.12/24"],
            },
        },
    }
    assert "gateway4" not in json.dumps(config) and "routes" not in json.dumps(config)
    # debian/12 turns cloud-init's network step off: a bootcmd sets the same address at
    # every boot, the values as arguments of a constant script.
    user_data = json.loads(iso_file(seed, "user-data").removeprefix("#cloud-config\n"))
    assert user_data["bootcmd"] == [
        ["sh", "-c", SEGMENT_BOOTCMD, "twarga-segments", "52:54:00:0a:00:0c", "10.77.0.12/24"]
    ]
    plain = build_seed_iso(tmp_path / "plain.iso", instance_id="i-2", hostname="web", ssh_keys=[])
    assert "/network-config" not in iso_names(plain)
    assert "bootcmd" not in iso_file(plain, "user-data")
    with pytest.raises(ValueError):
        build_seed_iso(tmp_path / "bad.iso", instance_id="i-3", hostname="web", ssh_keys=[],
                       segments=[("52:54:00:0a:00:0c", "10.77.0.12")])  # fmt: skip


# --- the guest scripts ----------------------------------------------------------------------


def _ipv4_function(script: str) -> str:
    match = re.search(r"^(twarga_is_ipv4|is_ipv4)\(\) \{\n.*?\n\}\n", script, re.S | re.M)
    assert match, "the address check is gone"
    return match.group(0) + f'{match.group(1)} "$1"\n'


@pytest.mark.parametrize("script", [INIT_SCRIPT, GUARD_SCRIPT])
@pytest.mark.parametrize(
    ("value", "valid"),
    [("10.77.0.11", True), ("255.255.255.255", True), ("0.0.0.0", True), ("256.1.1.1", False),
     ("01.2.3.4", False), ("1.2.3", False), ("1.2.3.4.5", False), ("1.2.3.4;reboot", False),
     ("1.2.3.4 5", False), ("$(reboot)", False), ("", False)],
)  # fmt: skip
def test_guest_scripts_accept_only_dotted_ipv4(script, value, valid):
    done = subprocess.run(["/bin/busybox", "sh", "-c", _ipv4_function(script), "sh", value],
                          capture_output=True, timeout=10)  # fmt: skip
    assert (done.returncode == 0) is valid


def test_the_guard_bans_with_a_prohibit_rule_before_local_delivery_and_logs_it():
    assert 'ip rule add pref 10 from "$addr" type prohibit' in GUARD_SCRIPT
    assert "ip rule add pref 100 table local" in GUARD_SCRIPT
    assert 'logger -t twarga-guard -p auth.notice "banned $addr"' in GUARD_SCRIPT
    assert "usleep" in GUARD_SCRIPT  # EOF while the host end is closed does not spin
    assert CONTROL_CHANNEL in INIT_SCRIPT and "/usr/sbin/twarga-guard" in INIT_SCRIPT
    assert "/run/seed/network" in INIT_SCRIPT


# --- the control channel client -------------------------------------------------------------


class FakeGuard:
    """A UNIX socket that answers like twarga-guard (or not at all)."""

    def __init__(self, path: Path, *, answer: bool = True) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(1)
        self.lines: list[str] = []
        self.answer = answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            stream = conn.makefile("rwb")
            line = stream.readline().decode().strip()
            self.lines.append(line)
            if self.answer:
                stream.write(b"ok ban 10.0.0.99\n")  # an earlier line's answer first
                stream.write(f"ok {line}\n".encode())
                stream.flush()
            conn.recv(1)  # until the client closes

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def guard_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "control.sock"


def test_send_control_line_waits_for_the_guest_answer(guard_path):
    guard = FakeGuard(guard_path)
    try:
        send_control_line(guard_path, "ban 10.77.0.11", timeout=5)
        assert guard.lines == ["ban 10.77.0.11"]
    finally:
        guard.close()


def test_send_control_line_times_out_without_an_answer(guard_path):
    guard = FakeGuard(guard_path, answer=False)
    try:
        with pytest.raises(ControlTimeout):
            send_control_line(str(guard_path), "unban 10.77.0.11", timeout=0.5)
    finally:
        guard.close()


def test_send_control_line_refuses_bad_lines_and_absent_sockets(guard_path):
    for line in ("ban 10.77.0.256", "ban 10.77.0.1\nreboot", "drop 10.0.0.1", "ban  1.2.3.4",
                 "ban 01.2.3.4", "BAN 1.2.3.4", ""):  # fmt: skip
        with pytest.raises(ValueError):
            send_control_line(guard_path, line)
    with pytest.raises(BackendError):
        send_control_line(guard_path, "ban 1.2.3.4", timeout=1)


# --- the switch -----------------------------------------------------------------------------


def test_a_real_switch_starts_once_and_stops(tmp_path):
    folder = tmp_path / "segments" / "lan"
    pid = start_switch(folder, owner=None)
    try:
        assert switch_running(folder) and (folder / "ctl").is_socket()
        assert folder.stat().st_mode & 0o777 == 0o700
        assert start_switch(folder, owner=None) == pid
        assert switch_pid(folder) == pid
    finally:
        stop_switch(folder)
    assert not folder.exists() and not switch_running(folder)


def test_a_forged_pid_file_is_not_trusted(tmp_path):
    folder = tmp_path / "lan"
    folder.mkdir()
    (folder / "switch.pid").write_text("1\n")
    assert switch_pid(folder) is None
    other = subprocess.Popen(["sleep", "30"])
    try:
        (folder / "switch.pid").write_text(f"{other.pid}\n")
        assert switch_pid(folder) is None  # alive, but not a vde_switch on this folder
        stop_switch(folder)  # removes the folder, kills nothing
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
    assert not folder.exists()


@pytest.mark.parametrize("bad", [Path("relative"), Path("/srv/a,b"), Path("/srv/" + "x" * 90)])
def test_switch_folders_are_absolute_without_commas(bad):
    with pytest.raises(ValueError):
        start_switch(bad, owner=None)
