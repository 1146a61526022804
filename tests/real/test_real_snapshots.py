"""Snapshots of a real twarga/tiny guest on qemu:///system: a running VM's snapshot holds
its memory: reverting resumes the guest as it was, with the files it had then."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest

from tests.real.conftest import LiveServer, running_server
from twarga_lab.client import Lab, NotFound

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with running_server(24600) as live:
        yield live


def test_revert_brings_back_the_guests_memory(server):
    lab = Lab(server.url, "alice-token")
    vm = lab.vms.create("snap-1", ram=512, cpu=1, disk=10)
    vm.wait("running", timeout=180, progress=False)
    assert vm.run("echo one > /tmp/f; cat /tmp/f", timeout=120) == "one"

    taken = vm.snapshot("s1")
    assert (taken["name"], taken["state"]) == ("s1", "running")
    assert vm.run("echo two > /tmp/f; cat /tmp/f", timeout=60) == "two"

    reverted = vm.revert("s1")
    assert reverted.status == "running"
    assert vm.run("cat /tmp/f", timeout=60) == "one"

    frame = vm.snapshots()
    assert list(frame["name"]) == ["s1"] and list(frame["state"]) == ["running"]
    # libvirt keeps it as an internal snapshot of the overlay.
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(vm.domain)
        assert dom.snapshotListNames() == ["s1"]
        xml = ET.fromstring(dom.snapshotLookupByName("s1").getXMLDesc())
        modes = {d.get("name"): d.get("snapshot") for d in xml.iterfind("disks/disk")}
        assert modes.pop("vda") == "internal"
        assert modes and set(modes.values()) == {"no"}  # the read-only seeds
        assert xml.find("memory").get("snapshot") == "internal"
    finally:
        conn.close()

    vm.delete_snapshot("s1")
    assert vm.snapshots().empty
    with pytest.raises(NotFound):
        vm.revert("s1")

    # A stopped VM gets a disk-only snapshot; reverting a running VM to it stops the VM.
    vm.force_stop()
    vm.wait("stopped", timeout=60, progress=False)
    assert vm.snapshot("off")["state"] == "shutoff"
    vm.start()
    vm.wait("running", timeout=60, progress=False)
    assert vm.revert("off").status == "stopped"

    vm.snapshot("before-destroy")
    vm.destroy()
    conn = libvirt.open("qemu:///system")
    try:
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(vm.domain)
    finally:
        conn.close()
