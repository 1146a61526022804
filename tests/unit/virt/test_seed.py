"""The tiny image's per-VM seed and syslog channel: secrets go on a disk, never on the
command line; the channel's socket is read back from the live XML."""

from __future__ import annotations

import subprocess
from pathlib import Path

import libvirt
import pytest

from twarga_lab.virt.domain import (
    SYSLOG_CHANNEL,
    ChannelSpec,
    DiskSpec,
    DomainSpec,
    build_domain_xml,
    channel_socket_path,
)
from twarga_lab.virt.seed import build_tiny_seed, generate_password, sha512_crypt
from twarga_lab.virt.tinyimage import INIT_SCRIPT, MODULE_LOAD_ORDER


@pytest.mark.parametrize(
    ("password", "salt"),
    [("hunter2", "saltsalt"), ("", "x"), ("pässwörd ✓", "G/2Jl9.rAbCdEfGh"), ("y" * 200, "ab")],
)
def test_sha512_crypt_matches_busybox_mkpasswd(password, salt):
    # busybox's mkpasswd is the same code path as the guest's libc crypt() checks.
    reference = subprocess.run(
        ["/bin/busybox", "mkpasswd", "-m", "sha512", "-S", salt, password],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert sha512_crypt(password, salt) == reference


def test_passwords_and_salts_are_random():
    assert generate_password() != generate_password()
    assert len(generate_password()) >= 20
    first, second = sha512_crypt("same"), sha512_crypt("same")
    assert first != second and first.startswith("$6$")


def iso_file(iso: Path, name: str) -> str:
    return subprocess.run(
        ["isoinfo", "-R", "-i", str(iso), "-x", f"/{name}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def test_seed_holds_the_key_and_the_hash_but_not_the_password(tmp_path):
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyExampleKeyExampleKeyExampleKey me@x"
    password = generate_password()
    seed = build_tiny_seed(
        tmp_path / "seed.iso", authorized_keys=[key], root_password_hash=sha512_crypt(password)
    )
    assert seed.stat().st_mode & 0o777 == 0o600
    assert iso_file(seed, "twarga-seed") == "1\n"
    assert iso_file(seed, "authorized_keys") == key + "\n"
    hashed = iso_file(seed, "root-password.hash").strip()
    assert hashed.startswith("$6$") and password not in seed.read_bytes().decode("latin-1")


def test_the_init_reads_the_seed_and_the_channel():
    assert "isofs" in MODULE_LOAD_ORDER
    assert "/run/seed/authorized_keys" in INIT_SCRIPT
    assert SYSLOG_CHANNEL in INIT_SCRIPT
    # No secret is read from the kernel command line any more.
    assert "twarga.password" not in INIT_SCRIPT


def spec(**overrides) -> DomainSpec:
    values = dict(
        name="twarga-9-ssh",
        memory_mib=512,
        vcpus=1,
        kernel=Path("/srv/tiny/vmlinuz"),
        initrd=Path("/srv/tiny/initrd.img"),
        cmdline=(("console", "ttyS0"), ("twarga.name", "ssh"), ("twarga.ssh", "1")),
        disks=(
            DiskSpec(Path("/srv/vm/disk.qcow2")),
            DiskSpec(Path("/srv/vm/twarga-seed.iso"), target="vdb", format="raw", readonly=True),
        ),
        channels=(ChannelSpec(SYSLOG_CHANNEL),),
    )
    values.update(overrides)
    return DomainSpec(**values)


def test_channel_and_read_only_seed_in_the_xml():
    xml = build_domain_xml(spec())
    assert '<channel type="unix">' in xml
    assert '<source mode="bind" />' in xml
    assert f'<target type="virtio" name="{SYSLOG_CHANNEL}" />' in xml
    seed = xml.split("twarga-seed.iso")[1].split("</disk>")[0]
    assert "<readonly />" in seed and 'dev="vdb"' in seed
    with pytest.raises(ValueError):
        ChannelSpec('x" /><evil')


def test_channel_socket_is_read_back_from_libvirt():
    conn = libvirt.open("test:///default")
    dom = conn.defineXML(
        build_domain_xml(spec(name="seed-check", channels=(ChannelSpec(SYSLOG_CHANNEL,
                                                                        Path("/run/x.sock")),)))
    )  # fmt: skip
    try:
        assert channel_socket_path(dom.XMLDesc(), SYSLOG_CHANNEL) == "/run/x.sock"
        assert channel_socket_path(dom.XMLDesc(), "org.other") is None
    finally:
        dom.undefine()
