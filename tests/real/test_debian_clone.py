"""A clone of a stopped ``debian/12`` VM boots as a VM of its own: what the owner wrote on the
source's disk is there, cloud-init ran again for the new instance (the clone's name as
hostname, new SSH host keys, the owner's key), and the source still boots as it was."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from tests.real.conftest import running_server
from tests.real.test_debian_vm import (
    ALICE,
    create_debian_vm,
    owner_key,
    wait_for_ssh,
    wait_status,
)

pytestmark = [pytest.mark.real, pytest.mark.timeout(1800)]

#: Copying a booted debian/12 disk (a few hundred MB changed over the base) on a busy host.
CLONE_DEADLINE = 600.0


def host_key_at(port: int) -> str:
    """The ed25519 host key the SSH server on 127.0.0.1:``port`` presents (ssh-keyscan)."""
    deadline = time.monotonic() + 60
    while True:
        scan = subprocess.run(
            ["ssh-keyscan", "-T", "10", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        keys = [
            line.split(None, 1)[1] for line in scan.stdout.splitlines() if " ssh-ed25519 " in line
        ]
        if keys:
            return keys[0].strip()
        assert time.monotonic() < deadline, scan
        time.sleep(2)


def act(api: str, vm_id: int, action: str) -> None:
    reply = httpx.post(
        f"{api}vms/{vm_id}/action", headers=ALICE, json={"action": action}, timeout=60
    )
    assert reply.status_code == 200, reply.text


def test_a_clone_of_a_debian_vm_boots_with_its_own_name_and_host_key(tmp_path):
    key = owner_key(tmp_path)
    with running_server(25700) as server:
        api = server.url + "twarga/api/"
        source = create_debian_vm(api, key, "deb-src")
        port = source["ssh_port"]
        wait_for_ssh(key, port, "echo written-before-the-clone > ~/kept && sync")
        source_key = host_key_at(port)
        act(api, source["id"], "stop")
        wait_status(api, source["id"], "stopped", timeout=180)

        reply = httpx.post(
            f"{api}vms/{source['id']}/clone", headers=ALICE, json={"name": "deb-copy"}, timeout=60
        )
        assert reply.status_code == 201, reply.text
        clone = wait_status(api, reply.json()["id"], "stopped", timeout=CLONE_DEADLINE)
        assert clone["ssh_port"] != port and clone["domain"] != source["domain"]

        act(api, clone["id"], "start")
        clone = wait_status(api, clone["id"], "running")
        out = wait_for_ssh(key, clone["ssh_port"], "hostname; cat ~/kept")
        assert out.split() == ["deb-copy", "written-before-the-clone"], out
        clone_key = host_key_at(clone["ssh_port"])
        assert clone_key != source_key

        # The source boots as it was, beside its clone: its name and its host key.
        act(api, source["id"], "start")
        wait_status(api, source["id"], "running")
        assert wait_for_ssh(key, port, "hostname").strip() == "deb-src"
        assert host_key_at(port) == source_key
        for vm in (clone, source):
            gone = httpx.delete(f"{api}vms/{vm['id']}", headers=ALICE, timeout=120)
            assert gone.status_code == 204, gone.text
