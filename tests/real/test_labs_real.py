"""A lab of two real tiny guests through the API: they reach each other on their private
segment and nothing else changes on the host; the lab's checks log in over SSH and pass;
six wrong passwords from the attacker to the target raise a critical event with the
attacker's segment address, and the target then refuses the attacker for real while its
owner still logs in through the forward; destroying the lab stops its switch."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.real.test_soc_ssh import SSH_OPTIONS, security_events

pytestmark = pytest.mark.real
BOOT_TIMEOUT = 180.0  # two TCG guests on a loaded 2-core machine
ATTACKER, TARGET = "10.77.0.11", "10.77.0.12"


@pytest.fixture
def twarga_config(real_settings) -> dict:
    # Six failures make a brute force here, as the scenario counts them.
    return real_settings(23700, bruteforce_maxretry=6, min_ram_mb=64, min_disk_gb=1)


def host_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return sorted(line.split(":")[1].strip() for line in out.stdout.splitlines())


def host_routes() -> str:
    return subprocess.run(
        ["ip", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    ).stdout


async def ssh(port: int, key: Path, command: str, timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ssh", *SSH_OPTIONS, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-i", str(key), "-p", str(port), "root@127.0.0.1", command,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(errors="replace")


def switch_pids(lab_id_networks: list[int], vms_dir: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"vde_switch"):
            for network_id in lab_id_networks:
                if str(vms_dir / "sw" / str(network_id)).encode() in argv:
                    pids.append(int(proc.name))
    return pids


async def test_a_real_lab_on_its_own_segment(api, twarga, cleanup_domains, tmp_path):
    from twarga_lab.db.models import LabNetwork

    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    reply = await api("PATCH", "me", body={"ssh_public_key": key.with_suffix(".pub").read_text()})
    assert reply.status == 200, reply.json
    links_before, routes_before = host_links(), host_routes()

    reply = await api("POST", "labs", body={"template": "attack-defend", "name": "duel"})
    assert reply.status == 201, reply.json
    lab_id = reply.json["id"]

    async def running():
        lab = (await api("GET", f"labs/{lab_id}")).json
        assert lab["status"] not in ("error", "destroyed"), lab
        return lab if lab["status"] == "running" and all(v["ready"] for v in lab["vms"]) else None

    lab = await wait_for(running, timeout=BOOT_TIMEOUT, interval=1.0)
    vms = {vm["lab_machine"]: vm for vm in lab["vms"]}
    assert vms["attacker"]["addresses"] == {"lan": ATTACKER}
    attacker_port, target_port = vms["attacker"]["ssh_port"], vms["target"]["ssh_port"]

    async def logged_in():
        code, out = await ssh(attacker_port, key, "echo in")
        return code == 0 and "in" in out

    await wait_for(logged_in, timeout=BOOT_TIMEOUT, interval=1.0)

    # The host gained no interface and no route; the segment is the switch's socket only.
    assert host_links() == links_before
    assert host_routes() == routes_before and "10.77." not in host_routes()
    with twarga.services.db.session() as session:
        network_ids = [n.id for n in session.query(LabNetwork).filter_by(lab_id=lab_id)]
    vms_dir = twarga.services.vms.settings.vms_dir
    assert len(switch_pids(network_ids, vms_dir)) == 1

    # The lab's checks run over SSH inside the guests, and pass: A pings B on the segment.
    checked = await api("POST", f"labs/{lab_id}/check")
    assert checked.status == 200, checked.json
    results = {r["check"]: r for r in checked.json["results"]}
    assert results["attacker reaches target"]["passed"], results
    assert "1 packets received" in results["attacker reaches target"]["output"]
    assert results["target has its lan address"]["passed"], results
    assert checked.json["score"] == checked.json["max_score"] == 2

    # Six wrong passwords from the attacker to the target, over the segment.
    wrong = (
        "DROPBEAR_PASSWORD=not-the-password timeout 20 dbclient -y -y "
        f"root@{TARGET} true; echo rc=$?"
    )
    for _ in range(6):
        code, out = await ssh(attacker_port, key, wrong)
        assert code == 0 and "rc=0" not in out, out

    async def alarm():
        events = await security_events(api, vms["target"]["id"])
        found = [e for e in events if e["details"].get("action") == "ssh_bruteforce"]
        return found or None

    (critical,) = await wait_for(alarm, timeout=30, interval=0.2)
    assert critical["severity"] == "critical" and critical["source"] == ATTACKER
    assert critical["details"]["enforced"] is True, critical
    assert ATTACKER in critical["message"] and "enforced inside the VM" in critical["message"]

    # The 7th connection from the attacker is refused by the target, at once.
    timed = f"s=$(date +%s); {wrong}; echo took=$(( $(date +%s) - s ))"
    code, out = await ssh(attacker_port, key, timed)
    took = int(re.search(r"took=(\d+)", out).group(1))  # type: ignore[union-attr]
    assert "rc=0" not in out and took <= 8, out
    assert re.search(r"No route to host|refused|prohibited", out, re.I), out
    # ... while the owner still logs in to the target through its forward.
    code, out = await ssh(target_port, key, "echo owner-ok; ip rule")
    assert code == 0 and "owner-ok" in out, out
    assert re.search(rf"from {re.escape(ATTACKER)}\b.*prohibit", out), out

    # When the ban ends (here: the clock moved past it) the guest accepts the attacker again:
    # the next wrong password is refused by the target's SSH server, not by its kernel.
    from datetime import timedelta

    from twarga_lab.db.models import utcnow

    later = utcnow() + timedelta(seconds=critical["details"]["bantime"] + 1)
    lifted = await asyncio.to_thread(twarga.services.labs.sweep_bans, later)
    assert lifted == [(vms["target"]["id"], ATTACKER)]
    code, out = await ssh(attacker_port, key, timed)
    assert "rc=0" not in out and not re.search(r"No route to host", out, re.I), out
    code, out = await ssh(target_port, key, "ip rule")
    assert ATTACKER not in out, out

    # Destroying the lab removes its VMs and stops its switch.
    started = time.monotonic()
    assert (await api("DELETE", f"labs/{lab_id}")).status == 204
    print(f"\nlab destroyed in {time.monotonic() - started:.1f} s")
    assert (await api("GET", f"labs/{lab_id}")).status == 404
    assert switch_pids(network_ids, vms_dir) == [] or all(
        "Z" in Path(f"/proc/{p}/stat").read_text().split()[2]
        for p in switch_pids(network_ids, vms_dir)
    )
    assert not (vms_dir / "sw" / str(network_ids[0])).exists()
    assert os.path.exists(vms_dir)
