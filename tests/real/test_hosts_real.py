"""Two hypervisor hosts for real: qemu:///system and a second, independent system libvirtd
(its own domains, state and sockets: ``tests/real/second_libvirtd.py``), both running
real tiny guests. Placement spreads the VMs; the second daemon killed with SIGKILL makes
its VMs ``unknown`` with an event while the first keeps serving (a new VM boots there);
restarted, its VMs are reconciled (running again: their QEMU processes lived on). A lab
goes on one host (h2, with local drained), network and all, and its check passes. h2 has
storage of its own: the image is copied there (a libvirt storage pool, a stream upload)
the first time, and only then."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.helpers import events_of_action, wait_for, wait_status
from tests.real.second_libvirtd import SecondLibvirtd
from twarga_lab.db.models import Event

pytestmark = pytest.mark.real


@pytest.fixture
def second_host() -> Any:
    daemon = SecondLibvirtd()
    daemon.prepare()
    daemon.start()
    yield daemon
    daemon.stop(prefix="twt")


@pytest.fixture
def twarga_config(real_settings, second_host) -> dict:
    return real_settings(
        26300,
        hosts=["local=qemu:///system", f"h2={second_host.uri}"],
        # h2 keeps images of its own: copied there through libvirt on first use.
        host_image_dirs={"h2": str(second_host.root / "images")},
        # h2's guests are TCG by its own setting, as a remote host's would be named: the
        # boot probe judges this machine only (here both share its hanging KVM).
        host_domain_types={"h2": "qemu"},
        min_ram_mb=64,  # the lab template's machines are 128 MB
        min_disk_gb=1,
    )


def events(twarga: Any, action: str) -> list[Event]:
    return events_of_action(twarga, action)


def local_domains(twarga: Any) -> set[str]:
    return set(twarga.services.backend.hosts["local"].backend.states(twarga.domain_prefix))


async def ready_vm(api: Any, name: str) -> dict[str, Any]:
    reply = await api("POST", "vms", body={"name": name, "ram": 256})
    assert reply.status == 201, reply.json
    await wait_status(api, reply.json["id"], "running", timeout=90)

    async def ready() -> dict[str, Any] | None:
        vm = (await api("GET", f"vms/{reply.json['id']}")).json
        return vm if vm["ready"] else None

    return await wait_for(ready, timeout=120, interval=0.2)  # booted: banner + SSH answer


async def test_two_real_hosts_spread_vms_and_survive_one_daemon_dying(
    api, twarga, second_host, cleanup_domains
):
    started = time.monotonic()
    first = await ready_vm(api, "spread-1")
    second = await ready_vm(api, "spread-2")
    # Both hosts are the same machine's RAM: the first goes on the first host, the second
    # where less is promised.
    assert (first["host"], second["host"]) == ("local", "h2")
    assert first["domain"] in local_domains(twarga)
    assert first["domain"] not in second_host.domains(twarga.domain_prefix)
    assert second_host.domains(twarga.domain_prefix) == {second["domain"]}
    booted = time.monotonic() - started
    # The image went to h2 once, through libvirt, and h2's guest boots from h2's copy.
    [copied] = events(twarga, "image_copied")
    assert (copied.details["host"], copied.details["image"]) == ("h2", "twarga/tiny")
    assert copied.details["bytes"] > 10 * 2**20
    xml = twarga.services.backend.hosts["h2"].backend.domain_xml(second["domain"])
    assert f"<kernel>{second_host.root / 'images'}/" in xml
    assert xml.startswith("<domain type='qemu'")
    local_xml = twarga.services.backend.hosts["local"].backend.domain_xml(first["domain"])
    assert f"<kernel>{twarga.images_dir}/" in local_xml
    metrics = twarga.services.metrics
    for _ in range(2):  # two ticks: CPU use is over the time between them
        await twarga.services.run(metrics.collect)
    hosts = {h["name"]: h for h in (await api("GET", "hosts", user="admin")).json}
    assert hosts["h2"]["state"] == "up" and hosts["h2"]["vms"] == 1
    for host in hosts.values():  # each libvirtd's own reading of the machine
        assert 0.0 <= host["cpu_usage_percent"] <= 100.0
        assert 0 < host["memory_available_mb"] <= host["memory_mb"]
    assert hosts["h2"]["memory_mb"] == hosts["local"]["memory_mb"] > 0
    assert (hosts["local"]["storage"], hosts["h2"]["storage"]) == ("shared", "own")
    assert hosts["h2"]["domain_type"] == "qemu"
    [image] = hosts["h2"]["images"]
    assert (image["image"], image["state"], image["percent"]) == ("twarga/tiny", "ready", 100.0)
    assert image["bytes"] == image["total_bytes"] == copied.details["bytes"]
    assert hosts["h2"]["disk_total_gb"] > 0 and hosts["h2"]["disk_free_gb"] > 0

    # h2's libvirtd dies: its VM is unknown, with an event; local keeps serving.
    second_host.kill()
    lost_at = time.monotonic()
    gone = await wait_status(api, second["id"], "unknown", timeout=30)
    noticed = time.monotonic() - lost_at
    assert gone["status_message"] == "its host h2 does not answer"
    [down] = events(twarga, "host_down")
    assert down.details["host"] == "h2" and down.details["vms"] == 1
    assert (await api("GET", f"vms/{first['id']}")).json["status"] == "running"
    hosts = {h["name"]: h for h in (await api("GET", "hosts", user="admin")).json}
    assert (hosts["local"]["state"], hosts["h2"]["state"]) == ("up", "down")
    third = await ready_vm(api, "while-h2-is-down")
    assert third["host"] == "local"

    # h2 comes back: the reconnect reconciles its VM (its QEMU process ran on meanwhile).
    second_host.start()
    back_at = time.monotonic()
    back = await wait_status(api, second["id"], "running", timeout=60)
    reconciled = time.monotonic() - back_at
    assert back["status_message"] is None and back["host"] == "h2"
    [up] = events(twarga, "host_up")
    assert up.details["host"] == "h2"
    last = [e for e in events(twarga, "reconcile") if e.vm_id == second["id"]][-1]
    assert (last.details["previous"], last.details["status"]) == ("unknown", "running")

    # Back in service: the next VM goes to h2 (fewer promised there) and boots from the
    # copy it has, without copying again.
    fourth = await ready_vm(api, "after-h2-is-back")
    assert fourth["host"] == "h2"
    assert len(events(twarga, "image_copied")) == 1

    # Every VM can be destroyed, whichever host it is on.
    for vm in (first, second, third, fourth):
        assert (await api("DELETE", f"vms/{vm['id']}")).status == 204

    # A lab stays on one host, its private network too: with local drained it goes to
    # h2, boots there, and its machines reach each other on their segment.
    drained = await api("PATCH", "hosts/local", body={"draining": True}, user="admin")
    assert drained.json["state"] == "draining"
    reply = await api("POST", "labs", body={"template": "attack-defend", "name": "far"})
    assert reply.status == 201, reply.json
    lab_id = reply.json["id"]
    assert {vm["host"] for vm in reply.json["vms"]} == {"h2"}

    async def lab_ready() -> bool:
        lab = (await api("GET", f"labs/{lab_id}")).json
        assert lab["status"] != "error", lab
        return lab["status"] == "running" and all(vm["ready"] for vm in lab["vms"])

    await wait_for(lab_ready, timeout=180, interval=0.5)
    checked = await api("POST", f"labs/{lab_id}/check")
    assert checked.status == 200, checked.json
    results = {r["check"]: r for r in checked.json["results"]}
    assert results["attacker reaches target"]["passed"], results
    await api("PATCH", "hosts/local", body={"draining": False}, user="admin")
    assert (await api("DELETE", f"labs/{lab_id}")).status == 204

    # Nothing is left on either host.
    async def all_gone() -> bool:
        return not local_domains(twarga) and not second_host.domains(twarga.domain_prefix)

    await wait_for(all_gone, timeout=60)
    print(
        f"\ntwo hosts: 2 guests booted in {booted:.1f} s; a dead libvirtd noticed in "
        f"{noticed:.2f} s; reconciled {reconciled:.1f} s after it was back; image copied "
        f"to h2: {copied.details['bytes'] / 2**20:.1f} MB in {copied.details['seconds']} s"
    )
