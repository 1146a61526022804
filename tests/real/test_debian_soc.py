"""OpenSSH on a ``debian/12`` VM made through the API: its seed has rsyslog forward the auth
log into the VM's virtio-serial syslog channel, so six wrong passwords give the same one
critical brute-force event as dropbear on tiny, and the generated password the owner reads
at ``/vms/{id}/credentials`` logs in as ``twarga``.

The SSH client is OpenSSH's ``ssh`` driven by ``sshpass``, through the VM's forward on
127.0.0.1; the guest runs under TCG (one to three minutes to boot).
"""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from tests.helpers import virsh
from tests.real.conftest import running_server
from tests.real.test_debian_vm import ALICE, create_debian_vm, owner_key, wait_for_ssh

pytestmark = [pytest.mark.real, pytest.mark.timeout(1200)]

SSH_OPTIONS = (
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=30",
    "-o", "PreferredAuthentications=password", "-o", "PubkeyAuthentication=no",
)  # fmt: skip
#: From the sixth failure to the event in the SOC (rsyslog, the channel, the detector).
EVENT_DEADLINE = 60.0


def password_login(port: int, password: str) -> int:
    """One password login as twarga; sshpass exits 5 for a refused password, 0 on success."""
    return subprocess.run(
        ["sshpass", "-p", password, "ssh", *SSH_OPTIONS, "-p", str(port),
         "twarga@127.0.0.1", "true"],
        capture_output=True, timeout=90,
    ).returncode  # fmt: skip


def critical_bruteforce(api: str, vm_id: int) -> list[dict]:
    events = httpx.get(
        api + "soc/events",
        headers=ALICE,
        params={"severity": "critical", "vm_id": str(vm_id), "limit": "1000"},
        timeout=30,
    )
    assert events.status_code == 200, events.text
    return [e for e in events.json() if e["details"].get("action") == "ssh_bruteforce"]


def test_openssh_brute_force_on_debian_reaches_the_soc_and_the_password_logs_in(tmp_path):
    key = owner_key(tmp_path)
    with running_server(24400) as server:
        api = server.url + "twarga/api/"
        vm = create_debian_vm(api, key, "deb-soc")
        booted = time.monotonic()

        creds = httpx.get(f"{api}vms/{vm['id']}/credentials", headers=ALICE, timeout=30)
        assert creds.status_code == 200, creds.text
        assert creds.json()["username"] == "twarga"
        password, port = creds.json()["password"], creds.json()["ssh_port"]
        assert len(password) >= 16 and port == vm["ssh_port"]
        bob = httpx.get(
            f"{api}vms/{vm['id']}/credentials",
            headers={"Authorization": "token bob-token"},
            timeout=30,
        )
        assert bob.status_code == 404
        domain_xml = virsh("dumpxml", vm["domain"]).stdout
        assert "org.twarga.syslog.0" in domain_xml and password not in domain_xml

        # Password logins are on once cloud-init's config stage has set them up (before,
        # sshd answers "publickey" only): wait for cloud-init to finish.
        out = wait_for_ssh(
            key, port, "cloud-init status --wait >/dev/null; systemctl is-active rsyslog"
        )
        assert out.strip() == "active"
        print(f"\ndebian/12: SSH up {time.monotonic() - booted:.0f} s after running")
        assert critical_bruteforce(api, vm["id"]) == []

        for _ in range(6):
            assert password_login(port, "wrong") == 5  # refused
        sixth = time.monotonic()
        deadline = sixth + EVENT_DEADLINE
        while not (alarms := critical_bruteforce(api, vm["id"])):
            assert time.monotonic() < deadline, "no brute-force event from sshd on debian/12"
            time.sleep(0.2)
        print(f"brute-force event {time.monotonic() - booted:.0f} s after running, "
              f"{time.monotonic() - sixth:.1f} s after the sixth failure")  # fmt: skip
        (alarm,) = alarms
        assert alarm["vm_id"] == vm["id"] and "deb-soc" in alarm["message"]
        assert alarm["source"] == "10.0.2.2"
        failed = httpx.get(
            api + "soc/events",
            headers=ALICE,
            params={"type": "security", "vm_id": str(vm["id"]), "limit": "1000"},
            timeout=30,
        ).json()
        failed = [e for e in failed if e["details"].get("action") == "ssh_failed"]
        assert len(failed) == 6, failed  # one per wrong password, OpenSSH's own lines
        assert {(e["details"]["server"], e["details"]["login"]) for e in failed} == {
            ("sshd", "twarga")
        }
        assert {e["details"]["channel"] for e in failed} == {"virtio"}

        # The ban is not enforced on 10.0.2.2 (everyone's NAT): the right password logs in.
        assert password_login(port, password) == 0
        assert len(critical_bruteforce(api, vm["id"])) == 1
        assert httpx.delete(f"{api}vms/{vm['id']}", headers=ALICE, timeout=120).status_code == 204
