"""Local accounts on the host against real guests on qemu:///system: they can neither read
a VM's disk, seed or console log, nor squat its SSH port while it is stopped."""

from __future__ import annotations

import secrets
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.helpers import virsh, wait_for, wait_status
from twarga_lab.db.models import Event

pytestmark = pytest.mark.real
BOOT_TIMEOUT = 90
SSH_PORTS = 23700


@pytest.fixture
def twarga_config(real_settings) -> dict:
    return real_settings(SSH_PORTS)


@pytest.fixture
def stranger() -> Iterator[str]:
    """A throwaway unprivileged local account, removed afterwards."""
    name = f"twl-x{secrets.token_hex(3)}"
    subprocess.run(["useradd", "-M", "-s", "/bin/sh", name], check=True)
    yield name
    subprocess.run(["pkill", "-u", name], capture_output=True)
    subprocess.run(["userdel", "-f", name], capture_output=True)


def as_user(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=30
    )


async def console_says(path: Path, text: str, occurrences: int = 1) -> bool:
    return path.exists() and path.read_text(errors="replace").count(text) >= occurrences


async def boot(api, twarga, name: str) -> tuple[dict, Path]:
    reply = await api("POST", "vms", body={"name": name})
    assert reply.status == 201, reply.json
    vm = await wait_status(api, reply.json["id"], "running", timeout=BOOT_TIMEOUT)
    log = twarga.services.vms.instance_dir(vm["domain"]) / "console.log"
    banner = f"Twarga Lab VM {name} is up"
    await wait_for(lambda: console_says(log, banner), timeout=BOOT_TIMEOUT, interval=0.2)
    return vm, log


def assert_private(stranger: str, folder: Path) -> None:
    files = [folder / "disk.qcow2", folder / "twarga-seed.iso", folder / "console.log"]
    for path in files:
        assert path.exists(), path
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, (path, oct(mode))
        read = as_user(stranger, "head", "-c", "16", str(path))
        assert read.returncode != 0 and "Permission denied" in read.stderr, (path, read)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    listing = as_user(stranger, "ls", str(folder))
    assert listing.returncode != 0 and "Permission denied" in listing.stderr, listing
    listing = as_user(stranger, "ls", str(folder.parent))
    assert listing.returncode != 0, listing  # nor see which VMs exist


async def test_a_local_account_cannot_read_a_vms_disk_seed_or_console(
    api, twarga, cleanup_domains, stranger
):
    vm, log = await boot(api, twarga, "private")
    folder = log.parent
    assert_private(stranger, folder)
    # libvirt still reaches everything: stop, start, and the guest boots again.
    await api("POST", f"vms/{vm['id']}/action", body={"action": "stop"})
    await wait_status(api, vm["id"], "stopped", timeout=60)
    assert_private(stranger, folder)  # libvirt gave the files back without opening them up
    await api("POST", f"vms/{vm['id']}/action", body={"action": "start"})
    await wait_status(api, vm["id"], "running", timeout=BOOT_TIMEOUT)
    banner = "Twarga Lab VM private is up"
    await wait_for(lambda: console_says(log, banner, 2), timeout=BOOT_TIMEOUT, interval=0.2)
    assert_private(stranger, folder)
    assert (await api("DELETE", f"vms/{vm['id']}")).status == 204
    assert not folder.exists()


def ssh_banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.settimeout(10)
        return conn.recv(64)


async def test_a_squatted_ssh_port_moves_at_start_and_the_owner_is_told(
    api, twarga, cleanup_domains, stranger
):
    vm, _log = await boot(api, twarga, "squatted")
    old = vm["ssh_port"]
    await wait_for(lambda: banner_starts(old, b"SSH-2.0-dropbear"), timeout=60, interval=0.5)
    await api("POST", f"vms/{vm['id']}/action", body={"action": "stop"})
    await wait_status(api, vm["id"], "stopped", timeout=60)
    # While the VM is off, another local account listens on its port with a fake server.
    fake = (
        "import socket\n"
        "s = socket.socket()\n"
        f"s.bind(('127.0.0.1', {old}))\n"
        "s.listen()\n"
        "while True:\n"
        "    c, _ = s.accept()\n"
        "    c.sendall(b'SSH-2.0-OpenSSH_9.2p1 collect-passwords\\r\\n')\n"
        "    c.close()\n"
    )
    squatter = subprocess.Popen(["runuser", "-u", stranger, "--", "/usr/bin/python3", "-c", fake])
    try:
        deadline = time.monotonic() + 10
        while not _listening(old):
            assert squatter.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        reply = await api("POST", f"vms/{vm['id']}/action", body={"action": "start"})
        assert reply.status == 200, reply.json
        started = await wait_status(api, vm["id"], "running", timeout=BOOT_TIMEOUT)
        new = started["ssh_port"]
        assert new != old and SSH_PORTS <= new < SSH_PORTS + 100
        assert f"{old}" in started["status_message"] and f"{new}" in started["status_message"]
        # The guest answers on the new port; the old one is the squatter's, not forwarded.
        xml = virsh("dumpxml", vm["domain"]).stdout
        assert f"hostfwd=tcp:127.0.0.1:{new}-:22" in xml
        assert f"127.0.0.1:{old}-" not in xml
        await wait_for(lambda: banner_starts(new, b"SSH-2.0-dropbear"), timeout=60, interval=0.5)
        assert b"collect-passwords" in ssh_banner(old)
        with twarga.services.db.session() as session:
            event = session.scalar(
                select(Event).where(
                    Event.vm_id == vm["id"],
                    Event.details["action"].as_string() == "ssh_port_moved",
                )
            )
            assert event is not None
            assert (event.type, event.severity, event.user_name) == ("security", "warning", "alice")
            assert (event.details["previous_port"], event.details["port"]) == (old, new)
        creds = (await api("GET", f"vms/{vm['id']}/credentials")).json
        assert creds["ssh_port"] == new
        assert (creds["ssh_port_moved"]["from"], creds["ssh_port_moved"]["to"]) == (old, new)
        # The owner can tell the guest from an impostor: the published host key is the one
        # the guest's SSH server presents (read by OpenSSH's ssh-keyscan).
        assert creds["ssh_host_key"].startswith("ssh-ed25519 ")
        assert host_key_at(new) == creds["ssh_host_key"]
        assert creds["ssh_host_key_fingerprint"] == fingerprint_of(creds["ssh_host_key"])
    finally:
        squatter.kill()
        squatter.wait(timeout=10)
    assert (await api("DELETE", f"vms/{vm['id']}")).status == 204


def host_key_at(port: int) -> str:
    scan = subprocess.run(
        ["ssh-keyscan", "-T", "10", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    lines = [line.split(None, 1)[1] for line in scan.stdout.splitlines() if " ssh-ed25519 " in line]
    assert lines, scan
    return lines[0].strip()


def fingerprint_of(public_key: str) -> str:
    shown = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", "-"],
        input=public_key + "\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return shown.stdout.split()[1]


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def banner_starts(port: int, prefix: bytes) -> bool:
    try:
        return ssh_banner(port).startswith(prefix)
    except OSError:
        return False  # not listening yet, or closed before the banner


async def test_a_restart_finishes_interrupted_work_and_removes_orphans(
    api, twarga, cleanup_domains
):
    from twarga_lab.db.models import VM, VMStatus
    from twarga_lab.virt.images import virtual_size_bytes

    vms = twarga.services.vms
    doomed, _ = await boot(api, twarga, "doomed")
    half, half_log = await boot(api, twarga, "half")
    await api("POST", f"vms/{half['id']}/action", body={"action": "force-stop"})
    await wait_status(api, half["id"], "stopped", timeout=30)
    # What a crash leaves: a destroy marked but not done (domain and disk still there) ...
    # ... a create that wrote half a disk and half a seed ...
    half_dir = vms.instance_dir(half["domain"])
    (half_dir / "disk.qcow2").write_bytes(b"QFI\xfb" + b"\0" * 100)
    with open(half_dir / "twarga-seed.iso", "r+b") as seed:
        seed.truncate(4096)
    with twarga.services.db.session() as session:
        session.get(VM, doomed["id"]).status = VMStatus.destroying
        session.get(VM, half["id"]).status = VMStatus.pending
    # ... and a domain with our prefix that no VM row knows, with its folder.
    ghost = f"{twarga.domain_prefix}999-ghost"
    ghost_xml = half_dir.parent / "ghost.xml"
    ghost_xml.write_text(
        f"<domain type='qemu'><name>{ghost}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"
    )
    assert virsh("define", str(ghost_xml)).returncode == 0
    ghost_xml.unlink()
    ghost_dir = vms.instance_dir(ghost)
    ghost_dir.mkdir()
    (ghost_dir / "disk.qcow2").write_bytes(b"left behind")

    restarted = twarga.make_services()  # the service starting again on the same database
    try:
        await restarted.vms.start_up()
        # The interrupted destroy is finished: no domain, no disk, no VM.
        assert virsh("dominfo", doomed["domain"]).returncode != 0
        assert not vms.instance_dir(doomed["domain"]).exists()
        assert (await api("GET", f"vms/{doomed['id']}")).status == 404
        # The orphan is reported and gone with its folder.
        assert virsh("dominfo", ghost).returncode != 0
        assert not ghost_dir.exists()
        with twarga.services.db.session() as session:
            orphan = session.scalars(
                select(Event).where(Event.details["action"].as_string() == "orphan_removed")
            ).all()
            assert [e.details["domain"] for e in orphan] == [ghost]
            assert orphan[0].severity == "warning"
        # The interrupted create is rebuilt from scratch and boots.
        await wait_status(api, half["id"], "running", timeout=BOOT_TIMEOUT)
        banner = "Twarga Lab VM half is up"
        await wait_for(lambda: console_says(half_log, banner), timeout=BOOT_TIMEOUT, interval=0.2)
        assert virtual_size_bytes(half_dir / "disk.qcow2") == half["disk"] * 2**30
        assert (half_dir / "twarga-seed.iso").stat().st_size > 4096
        assert not list(half_dir.glob(".*.tmp"))
    finally:
        await restarted.vms.wait_idle()
        await restarted.vms.shut_down()
        restarted.backend.close()
        restarted.db.dispose()
    assert (await api("DELETE", f"vms/{half['id']}")).status == 204
