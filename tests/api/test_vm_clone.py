"""Cloning a stopped VM on libvirt's test driver: the copy of the disk, its own domain, SSH
port, seed and host key, the SOC event, and every refusal (running source, someone else's
VM, a taken name, the create's quotas and credits, bad bodies)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
from sqlalchemy import select

from tests.helpers import wait_status
from twarga_lab.db.models import Event
from twarga_lab.event_schemas import load_schema

PATTERN = "0xa7"  # written into the source's disk, looked for in the clone's


async def create_stopped(api, name="origin", user="alice", **sizes):
    reply = await api("POST", "vms", user=user, body={"name": name, **sizes})
    assert reply.status == 201, reply.json
    await wait_status(api, reply.json["id"], "running", user=user)
    stop = await api(
        "POST", f"vms/{reply.json['id']}/action", user=user, body={"action": "force-stop"}
    )
    assert stop.status == 200, stop.json
    return await wait_status(api, reply.json["id"], "stopped", user=user)


def disk_of(twarga, domain: str) -> Path:
    return twarga.services.vms.instance_dir(domain) / "disk.qcow2"


def qemu_io(disk: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(disk)], capture_output=True, text=True
    )


async def test_a_clone_is_a_new_vm_with_a_copy_of_the_disk(api, twarga):
    source = await create_stopped(api)
    written = qemu_io(disk_of(twarga, source["domain"]), f"write -P {PATTERN} 1M 64k")
    assert written.returncode == 0, written.stderr
    before = (await api("GET", f"vms/{source['id']}")).json

    reply = await api("POST", f"vms/{source['id']}/clone", body={"name": "copy"})
    assert reply.status == 201, reply.json
    clone = reply.json
    assert reply.headers["Location"].endswith(f"/twarga/api/vms/{clone['id']}")
    assert clone["status"] in ("pending", "stopped")
    assert (clone["name"], clone["owner"]) == ("copy", "alice")
    assert (clone["image"], clone["ram"], clone["cpu"], clone["disk"]) == (
        source["image"], source["ram"], source["cpu"], source["disk"],
    )  # fmt: skip
    assert clone["id"] != source["id"]
    assert clone["domain"] != source["domain"] and clone["domain"].endswith("-copy")
    assert clone["ssh_port"] != source["ssh_port"]

    clone = await wait_status(api, clone["id"], "stopped")
    await twarga.services.vms.wait_idle()
    # The source is as it was.
    assert (await api("GET", f"vms/{source['id']}")).json == before
    assert twarga.services.backend.state(source["domain"]).value == "shutoff"
    # The clone's domain is defined (stopped), its disk an overlay on the image's base
    # with what was written into the source.
    assert twarga.services.backend.state(clone["domain"]).value == "shutoff"
    disk = disk_of(twarga, clone["domain"])
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(disk)],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    base = twarga.services.images.get(source["image"]).base_disk
    assert Path(info["backing-filename"]) == base
    assert info["virtual-size"] == source["disk"] * 1024**3
    read = qemu_io(disk, f"read -P {PATTERN} 1M 64k")
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read.stdout
    assert "Pattern verification failed" in qemu_io(disk, f"read -P {PATTERN} 4M 64k").stdout
    # Its own seed and SSH host key.
    vms = twarga.services.vms
    assert vms.host_key(clone["domain"]) and vms.host_key(source["domain"])
    assert vms.host_key(clone["domain"]) != vms.host_key(source["domain"])
    assert (vms.instance_dir(clone["domain"]) / "twarga-seed.iso").is_file()

    # One "cloned" event naming the source, valid against the vm schema.
    soc = await api("GET", "soc/events", user="admin", params={"vm_id": str(clone["id"])})
    assert soc.status == 200, soc.json
    cloned = [e for e in soc.json if e["details"].get("action") == "cloned"]
    assert len(cloned) == 1, soc.json
    assert cloned[0]["details"]["source_vm_id"] == source["id"]
    assert cloned[0]["details"]["actor"] == "alice" and cloned[0]["user_name"] == "alice"
    assert "origin" in cloned[0]["message"]
    jsonschema.validate(cloned[0], load_schema("vm"))

    # It starts as a VM of its own, and the source still starts too, beside it.
    started = await api("POST", f"vms/{clone['id']}/action", body={"action": "start"})
    assert started.status == 200, started.json
    await wait_status(api, clone["id"], "running")
    await api("POST", f"vms/{source['id']}/action", body={"action": "start"})
    await wait_status(api, source["id"], "running")
    me = (await api("GET", "me")).json
    assert me["usage"]["vms"] == 2


async def test_a_clone_outlives_its_source(api, twarga):
    source = await create_stopped(api)
    reply = await api("POST", f"vms/{source['id']}/clone", body={"name": "keeper"})
    clone = await wait_status(api, reply.json["id"], "stopped")
    assert (await api("DELETE", f"vms/{source['id']}")).status == 204
    assert qemu_io(disk_of(twarga, clone["domain"]), "read 0 64k").returncode == 0
    await api("POST", f"vms/{clone['id']}/action", body={"action": "start"})
    await wait_status(api, clone["id"], "running")


async def test_a_running_vm_is_not_cloned(api, twarga):
    reply = await api("POST", "vms", body={"name": "busy"})
    vm = await wait_status(api, reply.json["id"], "running")
    refused = await api("POST", f"vms/{vm['id']}/clone", body={"name": "copy"})
    assert (refused.status, refused.json["reason"]) == (409, "vm_not_stopped"), refused.json
    assert "stop" in refused.json["message"]
    assert [v["name"] for v in (await api("GET", "vms")).json] == ["busy"]


async def test_someone_elses_vm_is_not_there_to_clone_but_an_admin_may(api, twarga):
    source = await create_stopped(api)
    for user in ("bob",):
        refused = await api("POST", f"vms/{source['id']}/clone", user=user, body={"name": "mine"})
        assert (refused.status, refused.json["reason"]) == (404, "no_vm"), refused.json
    assert (await api("GET", "vms", user="bob")).json == []
    missing = await api("POST", "vms/999/clone", body={"name": "ghost"})
    assert (missing.status, missing.json["reason"]) == (404, "no_vm")
    # An admin's clone is the owner's VM, on the owner's quota.
    reply = await api("POST", f"vms/{source['id']}/clone", user="admin", body={"name": "twin"})
    assert reply.status == 201, reply.json
    assert reply.json["owner"] == "alice"
    await wait_status(api, reply.json["id"], "stopped")
    assert (await api("GET", "me")).json["usage"]["vms"] == 2


async def test_a_taken_name_is_refused(api, twarga):
    source = await create_stopped(api)
    await api("POST", "vms", body={"name": "other"})
    for name in ("origin", "other"):
        refused = await api("POST", f"vms/{source['id']}/clone", body={"name": name})
        assert (refused.status, refused.json["reason"]) == (409, "name_taken"), refused.json
    await twarga.services.vms.wait_idle()
    assert len((await api("GET", "vms")).json) == 2


@pytest.mark.parametrize(
    ("quota", "reason", "needle"),
    [
        ({"max_vms": 1}, "quota_exceeded", "at most 1 VMs"),
        ({"max_ram_mb": 1536}, "quota_exceeded", "1536 MB"),
        ({"max_cpu": 3}, "quota_exceeded", "vCPUs"),
        ({"max_disk_gb": 15}, "quota_exceeded", "GB more disk"),
    ],
)
async def test_the_create_quotas_apply(api, twarga, quota, reason, needle):
    source = await create_stopped(api, ram=1024, cpu=2, disk=10)
    assert (await api("PATCH", "admin/users/alice/quota", user="admin", body=quota)).status == 200
    refused = await api("POST", f"vms/{source['id']}/clone", body={"name": "copy"})
    assert (refused.status, refused.json["reason"]) == (409, reason), refused.json
    assert needle in refused.json["message"]
    # The same body as a create gets the same answer.
    create = await api("POST", "vms", body={"name": "copy", "ram": 1024, "cpu": 2, "disk": 10})
    assert (create.status, create.json["reason"]) == (409, reason)
    assert [v["name"] for v in (await api("GET", "vms")).json] == ["origin"]
    with twarga.services.db.session() as session:
        refusals = session.scalars(
            select(Event).where(
                Event.details["action"].as_string() == "cloned",
                Event.details["reason"].as_string() == reason,
            )
        ).all()
    assert len(refusals) == 1 and refusals[0].severity == "warning"


async def test_no_credits_no_clone(api, twarga):
    source = await create_stopped(api)
    taken = await api(
        "POST", "admin/users/alice/credits", user="admin",
        body={"amount": -(await api("GET", "me")).json["credits"], "reason": "test"},
    )  # fmt: skip
    assert taken.status == 200, taken.json
    refused = await api("POST", f"vms/{source['id']}/clone", body={"name": "copy"})
    assert (refused.status, refused.json["reason"]) == (409, "no_credits"), refused.json
    assert len((await api("GET", "vms")).json) == 1


BAD = [
    # (raw body, status, reason)
    ("not json", 400, "bad_json"),
    ("{}", 400, "missing_field"),
    ('{"name": 7}', 400, "bad_type"),
    ('{"name": "c", "ram": 1024}', 400, "unknown_field"),
    ('{"name": "Copy"}', 422, "invalid_name"),
    ('{"name": ""}', 422, "invalid_name"),
    ('{"name": "1st"}', 422, "invalid_name"),
    ('{"name": "' + "a" * 64 + '"}', 422, "invalid_name"),
]


@pytest.mark.parametrize(("raw", "status", "reason"), BAD)
async def test_bad_clone_bodies_are_refused(api, twarga, raw, status, reason):
    source = await create_stopped(api)
    reply = await api("POST", f"vms/{source['id']}/clone", raw=raw)
    assert (reply.status, reply.json["reason"]) == (status, reason), reply.json
    assert set(reply.json) >= {"message", "reason"}
    assert len((await api("GET", "vms")).json) == 1
