"""``debian/12`` is built here and really boots: raw libvirt, TCG, direct kernel boot.

The image is built by ``twarga-lab image build debian-12`` (``make test`` does it once per
machine; the cache makes later runs instant). Its domain is defined by hand with libvirt,
like the project's own domains: virtio disk (a qcow2 overlay in a folder libvirt's QEMU
user can reach), a NoCloud seed, the serial console logged to a file and QEMU's user-mode
NIC with ``restrict=on``, which reaches nothing outside the guest.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.conftest import REPO
from tests.helpers import free_port
from twarga_lab.virt.debian import DEBIAN_12
from twarga_lab.virt.domain import DiskSpec, DomainSpec, UserNetSpec, build_domain_xml
from twarga_lab.virt.images import ImageStore, build_seed_iso, create_overlay

#: A fresh build (when make test has not made one) counts against the first test's time.
pytestmark = [pytest.mark.real, pytest.mark.timeout(2400)]

CLI = str(Path(sys.executable).parent / "twarga-lab")
IMAGES = Path(os.environ.get("TWARGA_IMAGES_DIR", REPO / "vms" / "images"))
#: Under TCG on this 2-core machine the login prompt comes in about 40 s when it is idle.
BOOT_DEADLINE = 300.0
#: A fresh build takes a few minutes (mostly downloading and installing packages).
BUILD_DEADLINE = 1800


def twarga_lab(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def debian_image() -> dict:
    """The built image's image.json (built now if this machine has none yet)."""
    done = twarga_lab(
        "image", "build", "debian-12", "--images-dir", str(IMAGES), timeout=BUILD_DEADLINE
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((IMAGES / "debian" / "12" / "image.json").read_text())


def test_a_second_build_is_instant_and_the_store_lists_the_image(debian_image):
    started = time.monotonic()
    done = twarga_lab("image", "build", "debian-12", "--images-dir", str(IMAGES), timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "debian/12 is up to date" in done.stdout
    assert elapsed < 15, f"a cached build took {elapsed:.1f} s"
    assert debian_image["recipe"] == DEBIAN_12.digest()

    image = ImageStore(IMAGES).get("debian/12")
    assert image.kind == "disk" and image.cloud_init and image.os_type == "debian"
    assert image.kernel is not None and image.kernel.is_file()
    assert image.initrd is not None and image.initrd.is_file()
    assert image.min_disk_gb == 10
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", "-U", str(image.base_disk)],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert debian_image["cmdline"].startswith("root=/dev/vda console=ttyS0 ")
    assert debian_image["default_user"] == "twarga"
    assert debian_image["seed"] == "cloud-init-nocloud"
    listed = json.loads(twarga_lab("image", "list", "--images-dir", str(IMAGES), timeout=60).stdout)
    assert "debian/12" in [i["name"] for i in listed]


@pytest.fixture
def guest_folder() -> Iterator[Path]:
    """A folder libvirt's QEMU user can reach (not under pytest's 0700 temporary folders)."""
    folder = REPO / "vms" / "test-runs" / f"debian-{secrets.token_hex(4)}"
    folder.mkdir(parents=True)
    for path in (folder, folder.parent):
        path.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def libvirt_conn() -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("qemu:///system")
    yield conn
    conn.close()


def _console(path: Path) -> str:
    return path.read_text(errors="replace").replace("\r", "") if path.exists() else ""


def wait_console(path: Path, pattern: str, deadline: float, domain: libvirt.virDomain) -> float:
    """Poll the console log until ``pattern`` shows; the monotonic time it was seen."""
    regex = re.compile(pattern, re.MULTILINE)
    while True:
        if regex.search(_console(path)):
            return time.monotonic()
        state = domain.state()[0]
        assert state == libvirt.VIR_DOMAIN_RUNNING, f"guest stopped (state {state})"
        assert time.monotonic() < deadline, (
            f"no {pattern!r} on the console in time; tail:\n{_console(path)[-3000:]}"
        )
        time.sleep(0.5)


def test_debian_12_boots_under_tcg_to_the_login_prompt(debian_image, guest_folder, libvirt_conn):
    image = ImageStore(IMAGES).get("debian/12")
    assert image.kernel is not None and image.initrd is not None
    disk = guest_folder / "disk.qcow2"
    create_overlay(image.base_disk, disk, debian_image["min_disk_gb"])
    hostname = "deb-boot"
    key = guest_folder / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    seed = build_seed_iso(
        guest_folder / "seed.iso", instance_id=f"iid-{secrets.token_hex(4)}",
        hostname=hostname, ssh_keys=[key.with_suffix(".pub").read_text().strip()],
    )  # fmt: skip
    for path in (disk, seed):
        path.chmod(0o644)
    console = guest_folder / "console.log"
    name = f"twdebimg{secrets.token_hex(3)}-boot"
    spec = DomainSpec(
        name=name,
        memory_mib=debian_image["min_ram_mb"],
        vcpus=1,
        domain_type="qemu",
        kernel=image.kernel,
        initrd=image.initrd,
        cmdline=tuple(
            tuple(word.split("=", 1)) if "=" in word else (word, "")  # type: ignore[misc]
            for word in debian_image["cmdline"].split()
        ),
        disks=(
            DiskSpec(path=disk, target="vda"),
            DiskSpec(path=seed, target="hdc", format="raw", device="cdrom", bus="ide"),
        ),
        console_log=console,
        network=UserNetSpec(ssh_host_port=(ssh_port := free_port())),
    )
    domain = libvirt_conn.defineXML(build_domain_xml(spec))
    try:
        started = time.monotonic()
        domain.create()
        deadline = started + BOOT_DEADLINE
        login = wait_console(console, debian_image["login_banner"], deadline, domain)
        ready = wait_console(console, debian_image["ready_banner"], deadline, domain)
        wait_console(console, rf"^{hostname} login: ", deadline, domain)
        text = _console(console)
        print(
            f"\ndebian/12 under TCG: login prompt {login - started:.1f} s, "
            f"cloud-init finished {ready - started:.1f} s after start"
        )
        # The seed was applied: the prompt names the seeded host, cloud-init used NoCloud.
        assert re.search(rf"^Debian GNU/Linux 12 {hostname} ttyS0$", text, re.MULTILINE)
        assert "DataSourceNoCloud" in text
        assert "[FAILED]" not in text and "Invalid cloud-config" not in text, text[-3000:]
        # The seeded key logs in as twarga; systemd finished booting with no failed unit.
        ssh = subprocess.run(
            ["ssh", "-i", str(key), "-p", str(ssh_port), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "ConnectTimeout=30", "twarga@127.0.0.1",
             "systemctl is-system-running --wait; hostname; sudo -n true && echo sudo-ok; "
             "df --output=size -BG / | tail -1; ip -4 -br addr show eth0"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        lines = ssh.stdout.split()
        assert ssh.returncode == 0, ssh.stderr
        assert lines[:3] == ["running", hostname, "sudo-ok"], ssh.stdout + ssh.stderr
        assert "unable to resolve" not in ssh.stderr
        # cloud-init grew the 2 GB filesystem to the overlay's size; DHCP on eth0.
        assert int(lines[3].rstrip("G")) >= debian_image["min_disk_gb"] - 1, ssh.stdout
        assert "10.0.2.15/24" in ssh.stdout
    finally:
        if domain.isActive():
            domain.destroy()
        domain.undefine()
        artifacts = REPO / "test-artifacts" / "debian-image"
        artifacts.mkdir(parents=True, exist_ok=True)
        if console.exists():
            shutil.copy(console, artifacts / "console.log")


def test_an_unreachable_archive_fails_in_one_line_naming_the_source(tmp_path):
    """The real mmdebstrap against an apt source nobody listens on (loopback port 9)."""
    sources = tmp_path / "debian.sources"
    sources.write_text(
        "Types: deb\nURIs: http://127.0.0.1:9/debian\nSuites: bookworm\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    images = tmp_path / "images"
    done = twarga_lab(
        "image", "build", "debian-12", "--images-dir", str(images),
        "--apt-sources", str(sources), "--quiet", timeout=240,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(
        "twarga-lab: cannot reach Debian's archive at http://127.0.0.1:9/debian "
        f"(apt sources: {sources})"
    )
    assert "Could not connect to 127.0.0.1:9" in done.stderr
    # Nothing that looks like an image was left behind.
    assert ImageStore(images).list() == []
    assert list((images / "debian").iterdir()) == []
