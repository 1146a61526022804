"""A real guest on qemu:///system through the API, checked with virsh (a client we did
not write) and the guest's own serial console log."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.helpers import virsh, wait_for, wait_status
from twarga_lab.db.models import Event

pytestmark = pytest.mark.real
BOOT_TIMEOUT = 90


@pytest.fixture
def twarga_config(real_settings) -> dict:
    return real_settings(23000)


def domstate(domain: str) -> str:
    return virsh("domstate", domain).stdout.strip()


async def console_says(path: Path, text: str, *, occurrences: int = 1) -> bool:
    return path.exists() and path.read_text(errors="replace").count(text) >= occurrences


async def test_real_guest_boots_stops_starts_and_is_destroyed(api, twarga, cleanup_domains):
    reply = await api("POST", "vms", body={"name": "web-1", "ram": 512, "disk": 10})
    assert reply.status == 201, reply.json
    vm = reply.json
    await wait_status(api, vm["id"], "running", timeout=BOOT_TIMEOUT)
    assert domstate(vm["domain"]) == "running"
    domain_xml = virsh("dumpxml", vm["domain"]).stdout
    assert "<cmdline>console=ttyS0 quiet twarga.name=web-1 twarga.ssh=1</cmdline>" in domain_xml

    folder = twarga.services.vms.instance_dir(vm["domain"])
    log = folder / "console.log"
    banner = "Twarga Lab VM web-1 is up"
    await wait_for(lambda: console_says(log, banner), timeout=BOOT_TIMEOUT, interval=0.2)

    reply = await api("POST", f"vms/{vm['id']}/action", body={"action": "stop"})
    assert reply.status == 200
    await wait_status(api, vm["id"], "stopped", timeout=60)
    assert domstate(vm["domain"]) == "shut off"

    await api("POST", f"vms/{vm['id']}/action", body={"action": "start"})
    await wait_status(api, vm["id"], "running", timeout=BOOT_TIMEOUT)
    assert domstate(vm["domain"]) == "running"
    await wait_for(
        lambda: console_says(log, banner, occurrences=2), timeout=BOOT_TIMEOUT, interval=0.2
    )

    assert (await api("DELETE", f"vms/{vm['id']}")).status == 204
    assert virsh("dominfo", vm["domain"]).returncode != 0
    assert not folder.exists()
    assert not (folder / "disk.qcow2").exists()


async def test_virsh_destroy_behind_our_back_is_noticed(api, twarga, cleanup_domains):
    reply = await api("POST", "vms", body={"name": "victim"})
    vm = reply.json
    await wait_status(api, vm["id"], "running", timeout=BOOT_TIMEOUT)
    assert virsh("destroy", vm["domain"]).returncode == 0
    stopped = await wait_status(api, vm["id"], "stopped", timeout=5)
    assert stopped["uptime"] == 0

    async def outside_event():
        with twarga.services.db.session() as session:
            return session.scalar(
                select(Event).where(Event.vm_id == vm["id"], Event.severity == "warning")
            )

    event = await wait_for(outside_event, timeout=5)
    assert "outside Twarga" in event.message
    assert "destroyed" in event.message
    assert (await api("DELETE", f"vms/{vm['id']}")).status == 204


async def test_the_service_reconnects_after_libvirtd_restarts(api, twarga, cleanup_domains):
    reply = await api("POST", "vms", body={"name": "survivor"})
    vm = await wait_status(api, reply.json["id"], "running", timeout=BOOT_TIMEOUT)
    reconnected = asyncio.Event()
    loop = asyncio.get_running_loop()
    twarga.services.backend.add_reconnect_listener(
        lambda: loop.call_soon_threadsafe(reconnected.set)
    )
    subprocess.run(["pkill", "-x", "libvirtd"], check=True)
    # The old daemon holds its pid file until it has shut down (slow on a loaded machine):
    # a new one started before that exits at once.
    deadline = time.monotonic() + 60
    while subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "libvirtd did not stop within 60 s"
        await asyncio.sleep(0.1)
    subprocess.run(["libvirtd", "-d"], check=True)  # no systemd here: start it by hand
    await asyncio.wait_for(reconnected.wait(), timeout=60)
    # While libvirtd was away the VM was unknown; the reconnect's reconciliation makes it
    # running again (the guest outlived libvirtd), and lifecycle events flow again.
    await wait_status(api, vm["id"], "running", timeout=30)
    assert domstate(vm["domain"]) == "running"
    assert virsh("destroy", vm["domain"]).returncode == 0
    await wait_status(api, vm["id"], "stopped", timeout=10)
