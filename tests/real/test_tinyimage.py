"""The tiny image really boots: banner, serial shell, probe mode, ACPI power button.

These boot QEMU directly under TCG (no libvirt). Networking is either absent or QEMU's user
network with ``restrict=on``, which cannot reach anything outside the guest.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from twarga_lab.virt import probe
from twarga_lab.virt.tinyimage import (
    ImageBuildError,
    TinyImageFiles,
    build_tiny_image,
    load_tiny_image,
)

pytestmark = pytest.mark.real

QEMU = "qemu-system-x86_64"
BOOT_DEADLINE = 90.0  # generous: TCG on a loaded 2-core machine; ~5 s when idle


class SerialGuest:
    """A QEMU guest whose serial port is this process's pipe pair."""

    def __init__(self, argv: list[str]) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.output = ""
        self._pos = 0
        self.eof = False

    def _read(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self.eof:
            return
        if self._selector.select(remaining):
            assert self.proc.stdout is not None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if chunk:
                self.output += chunk.decode("utf-8", "replace").replace("\r", "")
            else:
                self.eof = True

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait for ``pattern`` (a multiline regex) after the previous match."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self._pos)
            if match:
                self._pos = match.end()
                return match
            if self.eof or time.monotonic() >= deadline:
                raise AssertionError(
                    f"no {pattern!r} within {timeout}s (eof={self.eof}); "
                    f"serial tail:\n{self.output[-2000:]}"
                )
            self._read(deadline)

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float) -> int:
        """Drain the serial output until QEMU exits by itself; its return code."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._read(deadline)
        return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._selector.close()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def qemu_argv(image: TinyImageFiles, cmdline: str, *extra: str) -> list[str]:
    return [
        QEMU,
        "-nographic",
        "-monitor", "none",
        "-serial", "stdio",
        "-no-reboot",
        "-m", "256",
        "-accel", "tcg",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", f"console=ttyS0 panic=-1 {cmdline}",
        *extra,
    ]  # fmt: skip


def qemu_processes_using(path: Path) -> list[int]:
    """PIDs of processes whose command line mentions ``path``."""
    needle = os.fsencode(str(path))
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and b"qemu" in cmdline:
            pids.append(int(entry.name))
    return pids


def qmp_command(sock_path: Path, command: str) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(sock_path))
        stream = sock.makefile("rwb")
        json.loads(stream.readline())  # greeting
        for cmd in ("qmp_capabilities", command):
            stream.write(json.dumps({"execute": cmd}).encode() + b"\n")
            stream.flush()
            while True:
                reply = json.loads(stream.readline())
                if "event" not in reply:
                    break
        return reply


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyImageFiles:
    started = time.monotonic()
    image = build_tiny_image(tmp_path_factory.mktemp("tiny"))
    print(f"\nbuilt twarga/tiny ({image.kernel_version}) in {time.monotonic() - started:.1f}s")
    return image


@pytest.fixture
def guest_factory() -> Iterator[list[SerialGuest]]:
    guests: list[SerialGuest] = []
    yield guests
    for guest in guests:
        guest.close()


def test_build_outputs(tiny: TinyImageFiles) -> None:
    assert tiny.kernel.is_file() and tiny.initrd.is_file()
    assert tiny.initrd.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert load_tiny_image(tiny.kernel.parent) == tiny
    listing = subprocess.run(
        f"zcat {tiny.initrd} | cpio -it --quiet", shell=True, capture_output=True, text=True,
        check=True,
    ).stdout.split()  # fmt: skip
    for path in ("init", "bin/busybox", "bin/sh", "usr/sbin/dropbear", "etc/passwd",
                 "usr/share/udhcpc/default.script", "etc/acpi/PWRF/00000080",
                 "lib64/ld-linux-x86-64.so.2"):  # fmt: skip
        assert path in listing, path
    assert any(p.endswith("/virtio_net.ko") for p in listing)
    assert any(p.endswith("/button.ko") for p in listing)


def test_boot_banner_shell_and_acpi_poweroff(
    tiny: TinyImageFiles, guest_factory: list[SerialGuest], tmp_path: Path
) -> None:
    qmp = tmp_path / "qmp.sock"
    nic_and_qmp = [
        "-netdev", "user,id=n0,restrict=on",  # DHCP from QEMU itself; nothing leaves the host
        "-device", "virtio-net-pci,netdev=n0",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip
    guest = SerialGuest(qemu_argv(tiny, "twarga.name=probe-vm", *nic_and_qmp))
    guest_factory.append(guest)

    guest.expect(r"^Twarga Lab VM probe-vm is up$", BOOT_DEADLINE)
    boot_seconds = time.monotonic() - guest.started
    print(f"\nboot to banner under TCG: {boot_seconds:.1f}s")

    guest.expect(re.escape("root@probe-vm:~# "), 30)
    guest.send("echo $((6*7))\n")
    guest.expect(r"^42$", 30)

    # libvirt's graceful shutdown is an ACPI power-button press.
    assert qmp_command(qmp, "system_powerdown") == {"return": {}}
    assert guest.wait_exit(30) == 0
    assert "reboot: Power down" in guest.output


def test_probe_mode_powers_off(tiny: TinyImageFiles, guest_factory: list[SerialGuest]) -> None:
    guest = SerialGuest(qemu_argv(tiny, "twarga.probe=1", "-nic", "none"))
    guest_factory.append(guest)
    guest.expect(r"^Twarga Lab VM twarga is up$", BOOT_DEADLINE)
    guest.expect(r"^TWARGA-PROBE-OK$", 10)
    assert guest.wait_exit(30) == 0


def test_run_until_marker_kills_at_deadline(tiny: TinyImageFiles) -> None:
    started = time.monotonic()
    # Far too short for any boot: the probe must give up and kill QEMU.
    assert not probe.kvm_usable(tiny.kernel, tiny.initrd, timeout=0.5)
    assert time.monotonic() - started < 12
    assert qemu_processes_using(tiny.initrd) == []


def test_tcg_probe_command_sees_marker(tiny: TinyImageFiles) -> None:
    argv = probe.probe_command(tiny.kernel, tiny.initrd, accel="tcg")
    assert probe.run_until_marker(argv, probe.PROBE_MARKER, BOOT_DEADLINE)
    assert qemu_processes_using(tiny.initrd) == []


def test_fixed_domain_types_do_not_probe(
    tiny: TinyImageFiles, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_probe(*args: object, **kwargs: object) -> bool:
        raise AssertionError("must not probe")

    monkeypatch.setattr(probe, "kvm_usable", no_probe)
    cache = tmp_path / "kvm-probe.json"
    assert probe.resolve_domain_type("qemu", tiny.kernel, tiny.initrd, cache) == "qemu"
    assert probe.resolve_domain_type("kvm", tiny.kernel, tiny.initrd, cache) == "kvm"
    assert not cache.exists()
    with pytest.raises(ValueError):
        probe.resolve_domain_type("xen", tiny.kernel, tiny.initrd, cache)


def test_auto_caches_its_answer(
    tiny: TinyImageFiles, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[float] = []

    def fake_probe(kernel: Path, initrd: Path, *, timeout: float = 20.0) -> bool:
        calls.append(timeout)
        return False

    fake_kvm = tmp_path / "kvm"
    fake_kvm.touch()
    monkeypatch.setattr(probe, "KVM_DEVICE", fake_kvm)
    monkeypatch.setattr(probe, "kvm_usable", fake_probe)
    cache = tmp_path / "kvm-probe.json"
    assert probe.resolve_domain_type("auto", tiny.kernel, tiny.initrd, cache) == "qemu"
    assert probe.resolve_domain_type("auto", tiny.kernel, tiny.initrd, cache) == "qemu"
    assert len(calls) == 1
    data = json.loads(cache.read_text())
    assert data["answer"] == "qemu"
    assert data["kernel_version"] == tiny.kernel_version

    # Without /dev/kvm, auto is qemu at once.
    monkeypatch.setattr(probe, "KVM_DEVICE", tmp_path / "no-kvm")
    cache.unlink()
    assert probe.resolve_domain_type("auto", tiny.kernel, tiny.initrd, cache) == "qemu"
    assert len(calls) == 1


def test_auto_on_this_host(tiny: TinyImageFiles, tmp_path: Path) -> None:
    """The real probe: whatever it answers, it answers in time and leaves no QEMU behind."""
    cache = tmp_path / "kvm-probe.json"
    started = time.monotonic()
    answer = probe.resolve_domain_type("auto", tiny.kernel, tiny.initrd, cache)
    elapsed = time.monotonic() - started
    print(f"\nauto -> {answer} in {elapsed:.1f}s")
    assert answer in ("kvm", "qemu")
    assert elapsed < 35
    assert qemu_processes_using(tiny.initrd) == []
    if probe.KVM_DEVICE.exists():
        assert json.loads(cache.read_text())["answer"] == answer
        started = time.monotonic()
        assert probe.resolve_domain_type("auto", tiny.kernel, tiny.initrd, cache) == answer
        assert time.monotonic() - started < 1


def test_missing_busybox_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="busybox-static") as info:
        build_tiny_image(tmp_path / "out", busybox=tmp_path / "no-busybox")
    assert info.value.package == "busybox-static"
    assert load_tiny_image(tmp_path / "out") is None


def test_missing_kernel_names_the_package(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    with pytest.raises(ImageBuildError, match="linux-image-cloud-amd64"):
        build_tiny_image(tmp_path / "out", boot_dir=tmp_path / "boot")


def test_an_image_of_an_older_recipe_is_rebuilt(tmp_path: Path) -> None:
    """A machine that built twarga/tiny before /init changed gets the new init on the next
    ``make image``, without --force."""
    from twarga_lab.virt.images import TINY_IMAGE, ImageStore

    store = ImageStore(tmp_path / "images")
    first = store.build_tiny()
    manifest_path = first.initrd.parent / "tinyimage.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["recipe"] = "an-older-recipe"
    manifest_path.write_text(json.dumps(manifest))
    first.initrd.write_bytes(b"an old init")
    assert load_tiny_image(first.initrd.parent) is None
    again = store.build_tiny()
    assert again.initrd.read_bytes()[:2] == b"\x1f\x8b"
    assert load_tiny_image(again.initrd.parent) is not None
    assert store.exists(TINY_IMAGE)
