"""SSH into a real guest: brute force is detected from the guest's own syslog channel (also
when it comes from another local account, as any tenant could), and the ban and the
counts survive a restart of the service.

The SSH client is OpenSSH's ``ssh`` driven by ``sshpass`` (Debian packages
``openssh-client`` and ``sshpass``), through the VM's forward on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.helpers import virsh, wait_for, wait_status
from tests.throwaway import python_as, run_as, throwaway_user, udp_flood
from twarga_lab.event_schemas import load_schema

pytestmark = pytest.mark.real
BOOT_TIMEOUT = 120
SSH_OPTIONS = (
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=30",
)  # fmt: skip
PASSWORD_ONLY = ("-o", "PreferredAuthentications=password", "-o", "PubkeyAuthentication=no")


@pytest.fixture
def twarga_config(real_settings) -> dict:
    return real_settings(23200)


async def ssh_with_password(port: int, password: str, *, user: str = "root") -> int:
    """One password login attempt; sshpass exits 5 for a wrong password, 0 on success."""
    proc = await asyncio.create_subprocess_exec(
        "sshpass", "-e", "ssh", *SSH_OPTIONS, *PASSWORD_ONLY, "-p", str(port),
        f"{user}@127.0.0.1", "true",
        env={**os.environ, "SSHPASS": password},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return await proc.wait()


async def ssh_with_key(port: int, key: Path, command: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ssh", *SSH_OPTIONS, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-i", str(key), "-p", str(port), "root@127.0.0.1", command,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def security_events(api: Any, vm_id: int, user: str = "alice") -> list[dict]:
    reply = await api(
        "GET", "soc/events", user=user,
        params={"type": "security", "vm_id": str(vm_id), "limit": "1000"},
    )  # fmt: skip
    assert reply.status == 200, reply.json
    return reply.json


def of_action(events: list[dict], action: str) -> list[dict]:
    return [e for e in events if e["details"].get("action") == action]


async def restart_extension(twarga: Any, serverapp: Any) -> None:
    """Stop every service and build new ones on the same database (the VM keeps running)."""
    await twarga.stop_extension()
    twarga.initialize_settings()
    serverapp.web_app.settings.update(twarga.settings)
    await twarga._start_jupyter_server_extension(serverapp)


async def test_brute_force_on_a_real_guest_is_detected_and_survives_a_restart(
    api, twarga, jp_serverapp, cleanup_domains, tmp_path
):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    reply = await api("PATCH", "me", body={"ssh_public_key": key.with_suffix(".pub").read_text()})
    assert reply.status == 200, reply.json

    vm = (await api("POST", "vms", body={"name": "target"})).json
    await wait_status(api, vm["id"], "running", timeout=BOOT_TIMEOUT)

    # Only the owner reads root's password; it is in no domain XML or console log.
    creds = await api("GET", f"vms/{vm['id']}/credentials")
    assert creds.status == 200, creds.json
    assert creds.json["username"] == "root" and creds.json["ssh_host"] == "127.0.0.1"
    assert 23200 <= creds.json["ssh_port"] <= 23299
    password, port = creds.json["password"], creds.json["ssh_port"]
    assert len(password) >= 16
    for other in ("bob", "admin"):
        assert (await api("GET", f"vms/{vm['id']}/credentials", user=other)).status == 404
    domain_xml = virsh("dumpxml", vm["domain"]).stdout
    assert password not in domain_xml
    assert "twarga.ssh=1" in domain_xml and "ssh-ed25519" not in domain_xml
    assert "org.twarga.syslog.0" in domain_xml

    # A key login works (and waits for the guest's SSH server to come up).
    async def key_login() -> str | None:
        code, out = await ssh_with_key(port, key, "hostname; id -u")
        return out if code == 0 else None

    out = await wait_for(key_login, timeout=BOOT_TIMEOUT, interval=1.0)
    assert out.split() == ["target", "0"]
    accepted = await wait_for(
        lambda: _with(api, vm["id"], "ssh_accepted"), timeout=10, interval=0.1
    )
    assert accepted[0]["details"]["method"] == "publickey"
    assert accepted[0]["severity"] == "info" and accepted[0]["details"]["channel"] == "virtio"

    # Six wrong passwords: one critical event within 5 s of the fifth failure.
    fifth_done = 0.0
    for attempt in range(1, 7):
        assert await ssh_with_password(port, "wrong-password") == 5
        if attempt == 5:
            fifth_done = time.monotonic()
            critical = await wait_for(
                lambda: _with(api, vm["id"], "ssh_bruteforce"), timeout=5, interval=0.05
            )
            print(f"\nbrute force event {time.monotonic() - fifth_done:.2f} s after the 5th")
    events = await wait_for(
        lambda: _count(api, vm["id"], "ssh_failed", 6), timeout=10, interval=0.1
    )
    critical = of_action(events, "ssh_bruteforce")
    assert len(critical) == 1
    (alarm,) = critical
    assert alarm["severity"] == "critical" and alarm["source"] == "10.0.2.2"
    assert alarm["vm_id"] == vm["id"] and "target" in alarm["message"]
    assert "10.0.2.2" in alarm["message"]
    assert alarm["details"]["enforced"] is False and alarm["details"]["ban_count"] == 1
    assert alarm["details"]["bantime"] == 600
    failed = of_action(events, "ssh_failed")
    assert all(e["severity"] == "warning" and e["details"]["login"] == "root" for e in failed)
    assert fifth_done > 0

    # The right password is an info event.
    assert await ssh_with_password(port, password) == 0
    logins = await wait_for(
        lambda: _count(api, vm["id"], "ssh_accepted", 2), timeout=10, interval=0.1
    )
    password_login = [
        e for e in of_action(logins, "ssh_accepted") if e["details"]["method"] == "password"
    ]
    assert len(password_login) == 1 and password_login[0]["severity"] == "info"

    # Bob sees none of it.
    assert await security_events(api, vm["id"], user="bob") == []

    bans = (await api("GET", "soc/bans")).json
    assert [(b["scope"], b["source"], b["active"]) for b in bans] == [
        (f"vm:{vm['id']}", "10.0.2.2", True)
    ]
    stats_before = (await api("GET", "soc/statistics", user="admin")).json

    await restart_extension(twarga, jp_serverapp)

    bans_after = (await api("GET", "soc/bans")).json
    assert bans_after == bans
    stats_after = (await api("GET", "soc/statistics", user="admin")).json
    assert stats_after["by_severity"]["critical"] == stats_before["by_severity"]["critical"]
    assert stats_after["active_bans"] == 1
    # The failure counts are in the database too: the 6th failure (after the ban cleared the
    # window) was 1, so the next one is 2 - read from the new service's own channel.
    domain = vm["domain"]
    await wait_for(lambda: _connected(twarga, domain), timeout=10, interval=0.05)
    assert await ssh_with_password(port, "still-wrong") == 5
    events = await wait_for(
        lambda: _count(api, vm["id"], "ssh_failed", 7), timeout=10, interval=0.1
    )
    last = max(of_action(events, "ssh_failed"), key=lambda e: e["id"])
    assert last["details"]["failures_in_window"] == 2
    assert len(of_action(events, "ssh_bruteforce")) == 1

    # Every event of the run matches its versioned schema.
    everything = (await api("GET", "soc/events", user="admin", params={"limit": "1000"})).json
    for event in everything:
        jsonschema.validate(event, load_schema(event["type"]))
    assert (await api("DELETE", f"vms/{vm['id']}")).status == 204


async def _with(api: Any, vm_id: int, action: str) -> list[dict] | None:
    return of_action(await security_events(api, vm_id), action) or None


async def _count(api: Any, vm_id: int, action: str, count: int) -> list[dict] | None:
    events = await security_events(api, vm_id)
    return events if len(of_action(events, action)) >= count else None


async def _connected(twarga: Any, domain: str) -> bool:
    event = twarga.services.syslog.channels.connected.get(domain)
    return event is not None and event.is_set()


async def test_brute_force_from_another_local_account_is_detected(api, twarga, cleanup_domains):
    """Every account on the host reaches every VM's 127.0.0.1 forward: a tenant guessing
    Alice's root password is caught by her guest's own syslog like anyone else."""
    vm = (await api("POST", "vms", body={"name": "victim"})).json
    await wait_status(api, vm["id"], "running", timeout=BOOT_TIMEOUT)
    creds = (await api("GET", f"vms/{vm['id']}/credentials")).json
    port, password = creds["ssh_port"], creds["password"]

    async def ssh_up() -> bool:  # the owner's login: no failure counted
        return await ssh_with_password(port, password) == 0

    await wait_for(ssh_up, timeout=BOOT_TIMEOUT, interval=1.0)

    async def guess(tenant: str) -> None:
        code, out = await run_as(
            tenant, "sshpass", "-e", "ssh", *SSH_OPTIONS, *PASSWORD_ONLY, "-p", str(port),
            "root@127.0.0.1", "true", env={**os.environ, "SSHPASS": "guess-123456"},
        )  # fmt: skip
        assert code == 5, out  # sshpass: the password was refused

    with throwaway_user() as tenant:
        for _ in range(6):
            await guess(tenant)
        events = await wait_for(
            lambda: _count(api, vm["id"], "ssh_failed", 6), timeout=10, interval=0.1
        )
        (alarm,) = of_action(events, "ssh_bruteforce")
        assert alarm["severity"] == "critical" and alarm["vm_id"] == vm["id"]
        assert alarm["source"] == "10.0.2.2" and alarm["details"]["failures"] == 5
        assert all(e["details"]["channel"] == "virtio" for e in of_action(events, "ssh_failed"))
        jsonschema.validate(alarm, load_schema("security"))
        assert [(b["vm_id"], b["source"]) for b in (await api("GET", "soc/bans")).json] == [
            (vm["id"], "10.0.2.2")
        ]
        assert await security_events(api, vm["id"], user="bob") == []

        # The tenant floods the network receiver: the guest's channel is still heard.
        ingest = twarga.services.syslog.ingest
        flood = asyncio.ensure_future(
            python_as(tenant, udp_flood(twarga.services.syslog.receiver.udp_port, 15))
        )

        async def dropping() -> bool:
            return ingest.dropped["network"] > 1000

        await wait_for(dropping, timeout=10)
        await guess(tenant)
        refused = time.monotonic()
        await wait_for(lambda: _count(api, vm["id"], "ssh_failed", 7), timeout=3, interval=0.05)
        print(f"\nguest's failure recorded {time.monotonic() - refused:.2f} s after the "
              "refusal, mid-flood")  # fmt: skip
        assert not flood.done(), "the flood ended too early to prove anything"
        await flood
    assert ingest.dropped["virtio"] == 0
    assert (await api("DELETE", f"vms/{vm['id']}")).status == 204
