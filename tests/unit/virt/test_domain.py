"""Domain XML built from objects, compared with golden files and read back by libvirt."""

from __future__ import annotations

import os
from pathlib import Path

import libvirt
import pytest

from twarga_lab.virt.domain import (
    DiskSpec,
    DomainSpec,
    UserNetSpec,
    build_domain_xml,
    read_twarga_metadata,
)

GOLDEN = Path(__file__).parent / "golden"


def tiny_spec(**overrides):
    values = dict(
        name="twarga-7-web-1",
        memory_mib=1024,
        vcpus=2,
        domain_type="qemu",
        uuid="3e3fce45-4f53-4fa7-bb32-11f34168b82b",
        kernel=Path("/srv/vms/images/twarga/tiny/vmlinuz"),
        initrd=Path("/srv/vms/images/twarga/tiny/initrd.img"),
        cmdline=(("console", "ttyS0"), ("quiet", ""), ("twarga.name", "web-1")),
        disks=(DiskSpec(Path("/srv/vms/instances/twarga-7-web-1/disk.qcow2")),),
        console_log=Path("/srv/vms/instances/twarga-7-web-1/console.log"),
        network=UserNetSpec(ssh_host_port=22007),
        owner="alice",
        vm_id=7,
    )
    values.update(overrides)
    return DomainSpec(**values)


def cloud_spec():
    return DomainSpec(
        name="twarga-8-db",
        memory_mib=2048,
        vcpus=1,
        domain_type="kvm",
        uuid="0f1e7d9a-4c1b-4d2e-9a8b-7c6d5e4f3a2b",
        disks=(
            DiskSpec(Path("/srv/vms/instances/twarga-8-db/disk.qcow2")),
            DiskSpec(
                Path("/srv/vms/instances/twarga-8-db/seed.iso"),
                target="hdc",
                format="raw",
                device="cdrom",
                bus="ide",
            ),
        ),
        console_log=Path("/srv/vms/instances/twarga-8-db/console.log"),
        network=UserNetSpec(ssh_host_port=22008),
        owner="bob <b@example.org>",
        vm_id=8,
    )


@pytest.mark.parametrize(
    ("golden", "spec"), [("tiny_domain.xml", tiny_spec), ("cloud_domain.xml", cloud_spec)]
)
def test_domain_xml_matches_golden_file(golden, spec):
    xml = build_domain_xml(spec())
    path = GOLDEN / golden
    if os.environ.get("TWARGA_REGEN_GOLDEN"):
        path.write_text(xml)
    assert xml == path.read_text()


def test_libvirt_accepts_and_keeps_our_xml():
    conn = libvirt.open("test:///default")
    spec = tiny_spec(name="golden-check", uuid=None)
    dom = conn.defineXML(build_domain_xml(spec))
    try:
        live = dom.XMLDesc()
        assert "<cmdline>console=ttyS0 quiet twarga.name=web-1</cmdline>" in live
        assert read_twarga_metadata(live) == {"id": "7", "owner": "alice"}
    finally:
        dom.undefine()


def test_metadata_with_markup_is_escaped():
    xml = build_domain_xml(cloud_spec())
    assert 'owner="bob &lt;b@example.org&gt;"' in xml
    assert read_twarga_metadata(xml)["owner"] == "bob <b@example.org>"


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "a</name><devices>"},
        {"name": "web 1"},
        {"name": ""},
        {"domain_type": "xen"},
        {"memory_mib": 0},
        {"vcpus": 0},
        {"cmdline": (("twarga.name", "x init=/bin/sh"),)},
        {"cmdline": (("bad key", "x"),)},
        {"kernel": None},
    ],
)
def test_values_that_could_break_the_xml_or_qemu_are_refused(bad):
    with pytest.raises(ValueError):
        tiny_spec(**bad)


def test_network_options_cannot_be_smuggled():
    with pytest.raises(ValueError):
        UserNetSpec(ssh_host_port=22)
    args = UserNetSpec(ssh_host_port=22001).qemu_args()
    assert args[1] == "user,id=twarganet0,restrict=on,hostfwd=tcp:127.0.0.1:22001-:22"
    assert all(not a.startswith("guestfwd") for a in args)
