"""``"ready"`` on real guests: a ``debian/12`` VM made through the API becomes ready when
cloud-init's final banner reaches its serial console, and the owner's key logs in right
then; a ``twarga/tiny`` VM (through the Python client's ``vm.wait("ready")``) is ready
when its ``Twarga Lab VM NAME is up`` banner comes, with dropbear already answering."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.real.conftest import running_server
from tests.real.test_debian_vm import ALICE, SSH_DEADLINE, create_debian_vm, owner_key, ssh
from twarga_lab.client import Lab

pytestmark = [pytest.mark.real, pytest.mark.timeout(1200)]

#: Once ready, SSH must answer at once: a few tries for a machine loaded by other guests.
SSH_AFTER_READY = 30.0


def wait_ready(api: str, vm_id: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        vm = httpx.get(f"{api}vms/{vm_id}", headers=ALICE, timeout=30).json()
        if vm["ready"]:
            assert vm["status"] == "running", vm
            return vm
        assert vm["status"] in ("pending", "running"), vm
        assert time.monotonic() < deadline, f"not ready after {timeout:.0f} s: {vm}"
        time.sleep(0.5)


Done = subprocess.CompletedProcess[str]


def ssh_soon(attempt: Callable[[], Done], what: str) -> Done:
    """Run ``attempt()`` until it succeeds, for at most :data:`SSH_AFTER_READY` s."""
    deadline = time.monotonic() + SSH_AFTER_READY
    while True:
        done = attempt()
        if done.returncode == 0:
            return done
        assert time.monotonic() < deadline, f"{what}: no SSH although ready: {done.stderr[-500:]}"
        time.sleep(1)


def ready_events(api: str, vm_id: int) -> list[dict]:
    events = httpx.get(
        api + "soc/events", headers=ALICE, params={"vm_id": str(vm_id), "type": "vm"}, timeout=30
    ).json()
    return [e for e in events if e["details"].get("action") == "ready"]


def root_ssh(key: Path, port: int, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "root@127.0.0.1", command],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_debian_and_tiny_vms_are_ready_when_their_guests_report_in(tmp_path):
    key = owner_key(tmp_path)
    with running_server(24700) as server:
        api = server.url + "twarga/api/"
        vm = create_debian_vm(api, key, "deb-ready")  # sets alice's key; returns at running
        running_at = time.monotonic()
        assert vm["ready"] is False  # cloud-init has not finished a second after boot
        vm = wait_ready(api, vm["id"], SSH_DEADLINE)
        print(f"\ndebian/12: ready {time.monotonic() - running_at:.0f} s after running")
        check = "hostname; cloud-init status --wait"
        out = ssh_soon(lambda: ssh(key, vm["ssh_port"], check), "debian")
        assert out.stdout.splitlines()[0] == "deb-ready"
        assert "status: done" in out.stdout  # ready means cloud-init has finished
        (event,) = ready_events(api, vm["id"])
        assert event["details"]["detail"] == "console banner (boot)"
        assert 0 < event["details"]["ready_seconds"] < SSH_DEADLINE

        lab = Lab(server.url, "alice-token")
        tiny = lab.vms.create("tiny-ready", ram=512, cpu=1, disk=10)
        tiny.wait("ready", timeout=180, progress=False)
        assert tiny.ready and tiny.status == "running"
        out = ssh_soon(lambda: root_ssh(key, tiny.ssh_port, "hostname"), "tiny")
        assert out.stdout.strip() == "tiny-ready"
        (event,) = ready_events(api, tiny.id)
        assert event["details"]["detail"] == "console banner (boot)"

        # Stopped, then started again: not ready until this boot's banner.
        tiny.stop()
        tiny.wait("stopped", timeout=60, progress=False)
        assert not tiny.ready
        tiny.start()
        assert not tiny.refresh().ready or len(ready_events(api, tiny.id)) == 2
        tiny.wait("ready", timeout=180, progress=False)
        assert len(ready_events(api, tiny.id)) == 2
        tiny.destroy()
        assert httpx.delete(f"{api}vms/{vm['id']}", headers=ALICE, timeout=120).status_code == 204
