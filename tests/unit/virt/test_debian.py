"""The Debian image builder's recipe, cache, atomic placement and error messages.

mmdebstrap is replaced by a stand-in program on ``PATH`` that writes a tiny rootfs (so these
run in seconds); mke2fs and qemu-img are the real ones. The real build and boot are in
``tests/real/test_debian_image.py``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from twarga_lab import cli
from twarga_lab.virt.debian import (
    DEBIAN_12,
    DebianBuildError,
    DebianImageBuilder,
    Progress,
    customize_rootfs,
    default_apt_sources,
)
from twarga_lab.virt.images import ImageStore

FAKE_MMDEBSTRAP = r"""#!{python}
# Stand-in for mmdebstrap: a rootfs with a kernel and an initrd, or a failure like apt's.
import json, os, sys
from pathlib import Path

calls = Path(os.environ["FAKE_MMDEBSTRAP_CALLS"])
with calls.open("a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
positional = [a for a in sys.argv[1:] if not a.startswith("--")]
suite, target, mirrors = positional[0], Path(positional[1]), positional[2:]
print("I: automatically chosen mode: root", file=sys.stderr)
print("I: running apt-get update...", file=sys.stderr)
if os.environ.get("FAKE_MMDEBSTRAP_FAIL"):
    print("Err:1 http://127.0.0.1:9/debian bookworm InRelease", file=sys.stderr)
    print("E: Failed to fetch http://127.0.0.1:9/debian/dists/bookworm/InRelease  "
          "Could not connect to 127.0.0.1:9 (127.0.0.1). - connect (111: Connection refused)",
          file=sys.stderr)
    print("E: mmdebstrap failed to run", file=sys.stderr)
    sys.exit(1)
for line in ("downloading packages with apt...", "extracting archives...",
             "installing essential packages...",
             "installing remaining packages inside the chroot...",
             "cleaning package lists and apt cache..."):
    print("I: " + line, file=sys.stderr)
for d in ("boot", "etc/ssh", "etc/network", "etc/cloud/cloud.cfg.d", "etc/systemd/system",
          "var/lib/dbus", "dev", "proc"):
    (target / d).mkdir(parents=True, exist_ok=True)
(target / "boot/vmlinuz-6.1.0-9-cloud-amd64").write_bytes(b"old kernel")
(target / "boot/initrd.img-6.1.0-9-cloud-amd64").write_bytes(b"old initrd")
(target / "boot/vmlinuz-6.1.0-10-cloud-amd64").write_bytes(b"kernel")
(target / "boot/initrd.img-6.1.0-10-cloud-amd64").write_bytes(b"initrd")
(target / "etc/resolv.conf").write_text("nameserver 10.255.255.53\n")
(target / "etc/hostname").write_text("buildhost\n")
(target / "etc/machine-id").write_text("48cbd901f9744f54a6045f39e7c9d073\n")
(target / "var/lib/dbus/machine-id").write_text("48cbd901f9744f54a6045f39e7c9d073\n")
(target / "etc/ssh/ssh_host_ed25519_key").write_text("shared secret key\n")
# update-initramfs runs in the rootfs (chroot): a busybox shell script stands in for it.
for d in ("bin", "usr/sbin"):
    (target / d).mkdir(parents=True, exist_ok=True)
(target / "bin/busybox").write_bytes(Path("/bin/busybox").read_bytes())
(target / "bin/busybox").chmod(0o755)
(target / "bin/sh").symlink_to("busybox")
(target / "usr/sbin/update-initramfs").write_text(
    '#!/bin/sh\nfor k in /boot/vmlinuz-*; do echo rebuilt >"/boot/initrd.img-${k#/boot/vmlinuz-}"; '
    'done\n'
)
(target / "usr/sbin/update-initramfs").chmod(0o755)
(target / "etc/apt").mkdir(parents=True, exist_ok=True)
(target / "etc/apt/sources.list").write_text("".join(Path(m).read_text() for m in mirrors))
"""


@pytest.fixture
def fake_mmdebstrap(tmp_path, monkeypatch) -> Path:
    """A stand-in ``mmdebstrap`` first on PATH; returns the file its calls are logged to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "mmdebstrap"
    program.write_text(FAKE_MMDEBSTRAP.replace("{python}", sys.executable))
    program.chmod(0o755)
    calls = tmp_path / "mmdebstrap-calls.jsonl"
    calls.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MMDEBSTRAP_CALLS", str(calls))
    return calls


@pytest.fixture
def sources(tmp_path) -> Path:
    path = tmp_path / "debian.sources"
    path.write_text(
        "Types: deb\nURIs: http://127.0.0.1:9/debian\nSuites: bookworm\nComponents: main\n"
    )
    return path


def calls_of(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def builder(images: Path, sources: Path, stream: io.StringIO | None = None, **kw):
    progress = Progress("debian-12", stream or io.StringIO())
    return DebianImageBuilder(images, apt_sources=[sources], progress=progress, **kw)


def test_recipe_hash_is_stable_and_changes_with_what_goes_in():
    assert DEBIAN_12.digest() == dataclasses.replace(DEBIAN_12).digest()
    assert len(DEBIAN_12.digest()) == 64
    for change in (
        {"packages": (*DEBIAN_12.packages, "vim")},
        {"suite": "trixie"},
        {"fs_size": "3G"},
        {"cmdline": "root=/dev/vda console=ttyS0"},
        {"masked": ()},
        {"files": (*DEBIAN_12.files, ("etc/motd", 0o644, "hello\n"))},
    ):
        assert dataclasses.replace(DEBIAN_12, **change).digest() != DEBIAN_12.digest(), change
    # The order packages are listed in is not part of what the image is.
    reordered = dataclasses.replace(DEBIAN_12, packages=tuple(reversed(DEBIAN_12.packages)))
    assert reordered.digest() == DEBIAN_12.digest()


def test_recipe_is_the_one_the_issue_asks_for():
    assert DEBIAN_12.image == "debian/12" and DEBIAN_12.suite == "bookworm"
    assert DEBIAN_12.variant == "apt"
    for package in ("systemd-sysv", "openssh-server", "cloud-init", "linux-image-cloud-amd64",
                    "ifupdown", "isc-dhcp-client", "netbase", "rsyslog", "sudo", "python3",
                    "cloud-guest-utils"):  # fmt: skip
        assert package in DEBIAN_12.packages
    meta = DEBIAN_12.metadata()
    assert meta["cmdline"].startswith("root=/dev/vda console=ttyS0")
    assert meta["default_user"] == "twarga"
    assert meta["seed"] == "cloud-init-nocloud"
    assert (meta["min_disk_gb"], meta["min_ram_mb"]) == (10, 512)
    assert meta["os_type"] == meta["family"] == "debian"
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "unattended-upgrades.service"):
        assert unit in DEBIAN_12.masked
    cloud_cfg = dict((p, c) for p, _, c in DEBIAN_12.files)["etc/cloud/cloud.cfg.d/90_twarga.cfg"]
    assert "datasource_list: [NoCloud, None]" in cloud_cfg
    # rsyslog forwards sshd's log from its first start, before cloud-init runs.
    soc = dict((p, c) for p, _, c in DEBIAN_12.files)["etc/rsyslog.d/10-twarga-soc.conf"]
    assert 'file="/dev/virtio-ports/org.twarga.syslog.0"' in soc and "auth,authpriv.*" in soc


def test_build_then_cached_then_forced(tmp_path, fake_mmdebstrap, sources):
    images = tmp_path / "images"
    stream = io.StringIO()
    first = builder(images, sources, stream).build()
    assert first.built
    image = ImageStore(images).get("debian/12")
    assert image.kind == "disk" and image.cloud_init and image.os_type == "debian"
    assert image.kernel is not None and image.kernel.read_bytes() == b"kernel"  # the newest
    # Its initrd was made again in the rootfs, with the image's own initramfs settings.
    assert image.initrd is not None and image.initrd.read_bytes() == b"rebuilt\n"
    meta = json.loads((images / "debian" / "12" / "image.json").read_text())
    assert meta["recipe"] == DEBIAN_12.digest()
    assert meta["kernel_version"] == "6.1.0-10-cloud-amd64"
    assert meta["apt_sources"] == [str(sources)]
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(image.base_disk)],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert info["format"] == "qcow2" and info["virtual-size"] == 2 * 2**30
    # The machine's apt sources are what mmdebstrap reads (its mirror arguments).
    (argv,) = calls_of(fake_mmdebstrap)
    assert argv[-1] == str(sources) and "bookworm" in argv
    assert "--variant=apt" in argv
    # Progress: percentages that only go up, ending at 100.
    percents = [int(line.split("]")[1].split("%")[0]) for line in stream.getvalue().splitlines()]
    assert percents == sorted(percents) and percents[-1] == 100 and len(percents) >= 6

    again = builder(images, sources).build()
    assert not again.built
    assert len(calls_of(fake_mmdebstrap)) == 1  # nothing ran

    forced = builder(images, sources).build(force=True)
    assert forced.built
    assert len(calls_of(fake_mmdebstrap)) == 2
    # Only the image is left in the images folder: no work or staging folders.
    assert sorted(p.name for p in (images / "debian").iterdir()) == ["12"]
    assert sorted(p.name for p in (images / "debian" / "12").iterdir()) == [
        "base.qcow2", "image.json", "initrd.img", "vmlinuz",
    ]  # fmt: skip


def test_a_changed_recipe_or_a_missing_file_rebuilds(tmp_path, fake_mmdebstrap, sources):
    images = tmp_path / "images"
    builder(images, sources).build()
    changed = dataclasses.replace(DEBIAN_12, packages=(*DEBIAN_12.packages, "less"))
    assert DebianImageBuilder(images, changed, apt_sources=[sources]).current() is False
    (images / "debian" / "12" / "initrd.img").unlink()
    assert builder(images, sources).current() is False
    assert builder(images, sources).build().built
    assert len(calls_of(fake_mmdebstrap)) == 2


def test_an_unreachable_archive_is_one_clear_line_and_the_old_image_stays(
    tmp_path, fake_mmdebstrap, sources, monkeypatch
):
    images = tmp_path / "images"
    builder(images, sources).build()
    monkeypatch.setenv("FAKE_MMDEBSTRAP_FAIL", "1")
    with pytest.raises(DebianBuildError) as failure:
        builder(images, sources).build(force=True)
    message = str(failure.value)
    assert "\n" not in message
    assert "cannot reach Debian's archive at http://127.0.0.1:9/debian" in message
    assert str(sources) in message and "Connection refused" in message
    # A failed rebuild leaves the image that was there, whole, and no half-made folder.
    assert ImageStore(images).exists("debian/12")
    assert sorted(p.name for p in (images / "debian").iterdir()) == ["12"]


def test_the_command_line_builds_caches_and_reports_failures(
    tmp_path, fake_mmdebstrap, sources, monkeypatch, capsys
):
    images = tmp_path / "images"
    argv = ["image", "build", "debian-12", "--images-dir", str(images)]
    argv += ["--apt-sources", str(sources)]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "image debian/12: built in" in out
    assert "100%" in err
    assert cli.main([*argv, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "debian/12 is up to date" in out and err == ""
    monkeypatch.setenv("FAKE_MMDEBSTRAP_FAIL", "1")
    assert cli.main([*argv, "--force", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("twarga-lab: cannot reach Debian's archive") and err.count("\n") == 1


def test_a_crashed_build_never_looks_like_an_image(tmp_path, fake_mmdebstrap, sources):
    images = tmp_path / "images"
    # What a crash leaves: a staging folder (complete but unplaced) and an old folder aside.
    for leftover in (".12.build-dead", ".12.old-dead"):
        folder = images / "debian" / leftover
        folder.mkdir(parents=True)
        (folder / "image.json.tmp").write_text(json.dumps({"name": "debian/12"}))
        (folder / "base.qcow2").write_bytes(b"half")
    assert not ImageStore(images).exists("debian/12")
    assert ImageStore(images).list() == []
    assert builder(images, sources).build().built
    assert sorted(p.name for p in (images / "debian").iterdir()) == ["12"]


def test_rootfs_is_made_a_vm_image_and_links_cannot_point_the_build_at_the_host(tmp_path):
    rootfs = tmp_path / "rootfs"
    for d in ("etc/ssh", "var/lib/dbus", "etc/systemd/system/timers.target.wants"):
        (rootfs / d).mkdir(parents=True)
    (rootfs / "etc/resolv.conf").write_text("nameserver 10.255.255.53\n")
    (rootfs / "etc/machine-id").write_text("48cbd901f9744f54a6045f39e7c9d073\n")
    (rootfs / "etc/ssh/ssh_host_rsa_key").write_text("key")
    (rootfs / "etc/systemd/system/timers.target.wants/apt-daily.timer").symlink_to(
        "/lib/systemd/system/apt-daily.timer"
    )
    customize_rootfs(rootfs, DEBIAN_12)
    assert (rootfs / "etc/resolv.conf").read_text() == ""
    assert (rootfs / "etc/machine-id").read_text() == ""
    assert not (rootfs / "etc/ssh/ssh_host_rsa_key").exists()
    assert not (rootfs / "etc/systemd/system/timers.target.wants/apt-daily.timer").is_symlink()
    assert os.readlink(rootfs / "etc/systemd/system/apt-daily.timer") == "/dev/null"
    assert os.readlink(rootfs / "etc/systemd/network/99-default.link") == "/dev/null"
    interfaces = (rootfs / "etc/network/interfaces").read_text()
    assert "iface eth0 inet dhcp" in interfaces
    assert [line for line in interfaces.splitlines() if line.startswith("iface")] == [
        "iface lo inet loopback", "iface eth0 inet dhcp",
    ]  # fmt: skip
    assert (rootfs / "etc/hostname").read_text() == "debian\n"

    # A rootfs whose /etc/network is a link to a host folder: the build refuses to write.
    outside = tmp_path / "host-etc-network"
    outside.mkdir()
    hostile = tmp_path / "hostile"
    (hostile / "etc").mkdir(parents=True)
    (hostile / "etc/network").symlink_to(outside)
    with pytest.raises(DebianBuildError, match="symlink"):
        customize_rootfs(hostile, DEBIAN_12)
    assert list(outside.iterdir()) == []


def test_default_apt_sources_are_the_machines_debian_ones(tmp_path):
    deb822 = tmp_path / "debian.sources"
    deb822.write_text("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n")
    empty = tmp_path / "sources.list"
    empty.write_text("# nothing here\n\n")
    missing = tmp_path / "absent.list"
    assert default_apt_sources([deb822, empty, missing]) == [deb822]
