"""Labs through the API on libvirt's test driver: a template's VMs and networks made,
started, stopped and destroyed as one, all or nothing, and only for their owner."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from tests.helpers import wait_for
from twarga_lab.db.models import VM, Event, Lab, LabNetwork, LabNIC

TWO_ON_A_LAN = {
    "schema": "twarga-lab-template/v1",
    "name": "pair",
    "networks": [{"name": "lan", "cidr": "10.77.0.0/24"}],
    "machines": [
        {"name": "a", "image": "twarga/tiny", "networks": [{"network": "lan"}]},
        {
            "name": "b",
            "image": "twarga/tiny",
            "networks": [{"network": "lan", "address": "10.77.0.20"}],
        },
    ],
    "checks": [{"name": "a answers", "machine": "a", "run": "true"}],
}


@pytest.fixture
def twarga_config():
    return {"min_ram_mb": 64, "min_disk_gb": 1}


async def wait_lab(api, lab_id, status, user="alice", timeout=15.0):
    async def probe():
        reply = await api("GET", f"labs/{lab_id}", user=user)
        assert reply.status == 200, reply.json
        return reply.json if reply.json["status"] == status else None

    return await wait_for(probe, timeout=timeout)


def lab_events(twarga, action):
    with twarga.services.db.session() as session:
        return session.scalars(
            select(Event).where(Event.details["action"].as_string() == action)
        ).all()


async def test_the_shipped_templates_are_listed(api):
    reply = await api("GET", "lab-templates")
    assert reply.status == 200
    names = {t["name"]: t for t in reply.json}
    assert {"attack-defend", "web-db"} <= set(names)
    assert names["attack-defend"]["vm_count"] == 2


async def test_a_lab_is_made_run_stopped_and_destroyed_as_one(api, twarga):
    reply = await api("POST", "labs", body={"template": TWO_ON_A_LAN, "name": "mine"})
    assert reply.status == 201, reply.json
    lab = reply.json
    assert reply.headers["Location"].endswith(f"/twarga/api/labs/{lab['id']}")
    assert lab["networks"] == [{"name": "lan", "cidr": "10.77.0.0/24"}]
    assert [vm["name"] for vm in lab["vms"]] == ["mine-a", "mine-b"]
    assert [vm["addresses"] for vm in lab["vms"]] == [{"lan": "10.77.0.10"}, {"lan": "10.77.0.20"}]
    lab = await wait_lab(api, lab["id"], "running")
    # The VMs are ordinary VMs too, marked with their lab.
    vms = {vm["name"]: vm for vm in (await api("GET", "vms")).json}
    assert vms["mine-a"]["lab_id"] == lab["id"] and vms["mine-a"]["lab_machine"] == "a"
    assert vms["mine-b"]["lab_name"] == "mine"
    assert [x["id"] for x in (await api("GET", "labs")).json] == [lab["id"]]

    stopped = await api("POST", f"labs/{lab['id']}/action", body={"action": "stop"})
    assert stopped.status == 200, stopped.json
    await wait_lab(api, lab["id"], "stopped")
    started = await api("POST", f"labs/{lab['id']}/action", body={"action": "start"})
    assert started.status == 200, started.json
    await wait_lab(api, lab["id"], "running")

    assert (await api("DELETE", f"labs/{lab['id']}")).status == 204
    assert (await api("GET", f"labs/{lab['id']}")).status == 404
    assert (await api("GET", "labs")).json == []
    assert not [vm for vm in (await api("GET", "vms")).json if vm["lab_id"] == lab["id"]]
    actions = [e.details["action"] for e in lab_events(twarga, "lab_create")]
    assert actions == ["lab_create"]
    assert len(lab_events(twarga, "lab_destroy")) == 1
    # The name is free again.
    again = await api("POST", "labs", body={"template": "attack-defend", "name": "mine"})
    assert again.status == 201, again.json


async def test_someone_elses_lab_does_not_exist_for_them(api):
    lab = (await api("POST", "labs", body={"template": TWO_ON_A_LAN, "name": "private"})).json
    for method, path, body in (
        ("GET", f"labs/{lab['id']}", None),
        ("POST", f"labs/{lab['id']}/action", {"action": "stop"}),
        ("POST", f"labs/{lab['id']}/check", None),
        ("DELETE", f"labs/{lab['id']}", None),
    ):
        reply = await api(method, path, user="bob", body=body)
        assert (reply.status, reply.json["reason"]) == (404, "no_lab"), (path, reply.json)
    assert (await api("GET", "labs", user="bob")).json == []
    assert (await api("GET", f"labs/{lab['id']}")).status == 200


@pytest.mark.parametrize(
    ("change", "status", "reason", "field"),
    [
        (lambda t: t["machines"][0].update(image="nope/42"), 422, "unknown_image",
         "machines[0].image"),
        (lambda t: t["machines"][1]["networks"][0].update(network="dmz"), 422,
         "unknown_network", "machines[1].networks[0].network"),
        (lambda t: t["machines"][1]["networks"][0].update(address="10.78.0.1"), 422,
         "bad_address", "machines[1].networks[0].address"),
    ],
)  # fmt: skip
async def test_a_bad_template_is_refused_with_where_and_why(
    api, twarga, change, status, reason, field
):
    import copy

    template = copy.deepcopy(TWO_ON_A_LAN)
    change(template)
    reply = await api("POST", "labs", body={"template": template, "name": "bad"})
    assert (reply.status, reply.json["reason"]) == (status, reason), reply.json
    assert reply.json["field"] == field
    assert reply.json["message"]
    with twarga.services.db.session() as session:
        assert session.scalar(select(func.count(Lab.id))) == 0


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"template": "attack-defend"}, 400, "missing_field"),
        ({"template": "attack-defend", "name": "Bad Name"}, 422, "invalid_name"),
        ({"template": "attack-defend", "name": "mine\n"}, 422, "invalid_name"),
        ({"template": "no-such", "name": "mine"}, 404, "no_template"),
        ({"template": 7, "name": "mine"}, 400, "bad_type"),
        ({"template": "attack-defend", "name": "mine", "extra": 1}, 400, "unknown_field"),
    ],
)
async def test_bad_create_bodies(api, body, status, reason):
    reply = await api("POST", "labs", body=body)
    assert (reply.status, reply.json["reason"]) == (status, reason), reply.json


class TestQuota:
    @pytest.fixture
    def twarga_config(self):
        return {"min_ram_mb": 64, "min_disk_gb": 1, "max_vms_per_user": 1}

    async def test_a_lab_that_does_not_fit_leaves_nothing_behind(self, api, twarga):
        reply = await api("POST", "labs", body={"template": TWO_ON_A_LAN, "name": "toobig"})
        assert (reply.status, reply.json["reason"]) == (409, "quota_exceeded"), reply.json
        assert "at most 1 VMs" in reply.json["message"]
        with twarga.services.db.session() as session:
            for model in (Lab, LabNetwork, LabNIC, VM):
                assert session.scalar(select(func.count()).select_from(model)) == 0, model
        assert (await api("GET", "labs")).json == []
        refusals = [e for e in lab_events(twarga, "lab_create") if e.severity == "warning"]
        assert len(refusals) == 1 and refusals[0].details["reason"] == "quota_exceeded"
        # A plain VM still fits: the refused lab took no quota.
        assert (await api("POST", "vms", body={"name": "single", "ram": 64})).status == 201


async def test_a_vm_that_fails_to_build_takes_the_whole_lab_down(api, twarga, monkeypatch):
    from twarga_lab.errors import BackendError

    provisioner = twarga.services.vms.provisioner
    real = provisioner.prepare_disks

    def failing(vm_id):
        with twarga.services.db.session() as session:
            if session.get(VM, vm_id).lab_machine == "b":
                raise BackendError("qemu-img create failed: disk full")
        return real(vm_id)

    monkeypatch.setattr(provisioner, "prepare_disks", failing)
    reply = await api("POST", "labs", body={"template": TWO_ON_A_LAN, "name": "doomed"})
    assert reply.status == 201

    async def gone():
        return (await api("GET", f"labs/{reply.json['id']}")).status == 404

    await wait_for(gone, timeout=15)
    assert (await api("GET", "vms")).json == []
    failed = lab_events(twarga, "lab_create_failed")
    assert len(failed) == 1 and "disk full" in failed[0].message
    assert not list((twarga.services.vms.settings.instances_dir).glob("*doomed*"))
