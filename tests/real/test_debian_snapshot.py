"""Snapshot, change a file, revert, the file is back: a ``debian/12`` VM on qemu:///system
through the API, as a user would, reached over SSH; the snapshot counts in ``/me``."""

from __future__ import annotations

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

pytestmark = [pytest.mark.real, pytest.mark.timeout(1200)]


def test_revert_brings_a_changed_file_back(tmp_path):
    key = owner_key(tmp_path)
    with running_server(25100) as server:
        api = server.url + "twarga/api/"
        vm = create_debian_vm(api, key, "deb-snap")
        port = vm["ssh_port"]
        wait_for_ssh(key, port, "echo before > ~/file && sync")
        base = f"{api}vms/{vm['id']}/snapshots"

        taken = httpx.post(base, headers=ALICE, json={"name": "s1"}, timeout=300)
        assert taken.status_code == 201, taken.text
        assert taken.json()["state"] == "running"
        usage = httpx.get(api + "me", headers=ALICE).json()["usage"]
        assert usage["snapshot_disk_gb"] == vm["disk"]

        assert wait_for_ssh(key, port, "echo after > ~/file && sync && cat ~/file") == "after\n"
        reverted = httpx.post(f"{base}/s1", headers=ALICE, json={"action": "revert"}, timeout=300)
        assert reverted.status_code == 200, reverted.text
        wait_status(api, vm["id"], "running")
        assert wait_for_ssh(key, port, "cat ~/file") == "before\n"

        deleted = httpx.delete(f"{base}/s1", headers=ALICE, timeout=120)
        assert deleted.status_code == 204, deleted.text
        assert httpx.get(base, headers=ALICE).json() == []
        assert httpx.get(api + "me", headers=ALICE).json()["usage"]["snapshot_disk_gb"] == 0
        assert httpx.delete(f"{api}vms/{vm['id']}", headers=ALICE, timeout=120).status_code == 204
