"""Several hypervisor hosts with libvirt's test driver: two independent hosts (the shared
``test:///default`` and a private ``test:///<file>`` of its own), placement by free RAM,
``GET/PATCH /twarga/api/hosts`` for admins, drain, a lab on one host, the ``host`` label
in Prometheus, and a host that stops answering (its VMs ``unknown`` with an event) and
comes back (reconciled). The same with real libvirt daemons and guests:
``tests/real/test_hosts_real.py``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import events_of_action, wait_for, wait_status
from twarga_lab import errors
from twarga_lab.client import Lab, NotFound, PermissionDenied
from twarga_lab.db.models import VM, Event, VMStatus
from twarga_lab.errors import BackendUnavailable
from twarga_lab.virt.host_images import ImageCopy
from twarga_lab.virt.hosts import HostState

# A second host of the test driver with its own state: 4 CPUs, 4 GiB.
HOST_B_XML = """<node>
  <cpu><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>
  <memory>4194304</memory>
</node>
"""


@pytest.fixture
def twarga_config(tmp_path: Path) -> dict[str, Any]:
    node = tmp_path / "host-b.xml"
    node.write_text(HOST_B_XML)
    # test:///default reports 3072 MB and 16 CPUs: "b" (4096 MB) has more room at first.
    return {"hosts": ["a=test:///default", f"b=test://{node}"], "min_ram_mb": 64}


def events(twarga: Any, action: str) -> list[Event]:
    return events_of_action(twarga, action)


def domains_on(twarga: Any, host: str) -> set[str]:
    backend = twarga.services.backend.hosts[host].backend
    return set(backend.states(twarga.domain_prefix))


async def create(api: Any, name: str, ram: int = 512, user: str = "alice") -> dict[str, Any]:
    reply = await api("POST", "vms", body={"name": name, "ram": ram}, user=user)
    assert reply.status == 201, reply.json
    return await wait_status(api, reply.json["id"], "running", user=user)


async def test_hosts_are_listed_for_admins_only(api):
    assert (await api("GET", "hosts")).status == 403
    assert (await api("GET", "hosts/a")).status == 403
    assert (await api("PATCH", "hosts/a", body={"draining": True})).status == 403
    reply = await api("GET", "hosts", user="admin")
    assert reply.status == 200
    hosts = {h["name"]: h for h in reply.json}
    assert set(hosts) == {"a", "b"}
    assert hosts["a"]["state"] == hosts["b"]["state"] == "up"
    assert hosts["a"]["default"] is True and hosts["b"]["default"] is False
    assert (hosts["a"]["memory_mb"], hosts["b"]["memory_mb"]) == (3072, 4096)
    assert (hosts["a"]["vcpus"], hosts["b"]["vcpus"]) == (16, 4)
    assert hosts["b"]["uri"].startswith("test:///") and hosts["b"]["vms"] == 0
    missing = await api("GET", "hosts/nowhere", user="admin")
    assert missing.status == 404 and missing.json["reason"] == "no_host"


async def test_new_vms_go_where_most_ram_is_free_and_spread(api, twarga):
    placed = [(await create(api, f"spread-{i}"))["host"] for i in range(4)]
    # b: 4096 free > a: 3072, then 3584 > 3072, then a tie (3072 each: fewer VMs wins), ...
    assert placed == ["b", "b", "a", "b"]
    vms = (await api("GET", "vms")).json
    for vm in vms:
        assert vm["domain"] in domains_on(twarga, vm["host"])
        other = "a" if vm["host"] == "b" else "b"
        assert vm["domain"] not in domains_on(twarga, other)
    hosts = {h["name"]: h for h in (await api("GET", "hosts", user="admin")).json}
    assert (hosts["a"]["vms"], hosts["b"]["vms"]) == (1, 3)
    assert (hosts["a"]["ram_used_mb"], hosts["b"]["ram_used_mb"]) == (512, 1536)
    assert hosts["b"]["ram_free_mb"] == 4096 - 1536

    # Every action reaches the VM on its own host.
    vm = next(v for v in vms if v["host"] == "b")
    reply = await api("POST", f"vms/{vm['id']}/action", body={"action": "stop"})
    assert reply.status == 200, reply.json
    await wait_status(api, vm["id"], "stopped")
    assert (await api("DELETE", f"vms/{vm['id']}")).status == 204

    async def undefined() -> bool:
        return vm["domain"] not in domains_on(twarga, "b")

    await wait_for(undefined, timeout=10)


async def test_a_drained_host_takes_no_new_vms_and_keeps_its_own(api, twarga):
    first = await create(api, "before-drain")
    assert first["host"] == "b"
    reply = await api("PATCH", "hosts/b", body={"draining": True}, user="admin")
    assert reply.status == 200, reply.json
    assert reply.json["state"] == "draining" and reply.json["draining"] is True
    assert [e.details["host"] for e in events(twarga, "host_drain")] == ["b"]
    assert [(await create(api, f"drained-{i}"))["host"] for i in range(2)] == ["a", "a"]
    assert (await api("GET", f"vms/{first['id']}")).json["status"] == "running"

    # Bad bodies lose nothing; taking it back lets it take VMs again.
    bad = await api("PATCH", "hosts/b", body={"draining": "yes"}, user="admin")
    assert bad.status == 400 and bad.json["reason"] == "bad_type"
    assert (await api("PATCH", "hosts/b", body={}, user="admin")).json["reason"] == "missing_field"
    reply = await api("PATCH", "hosts/b", body={"draining": False}, user="admin")
    assert reply.json["state"] == "up"
    assert (await create(api, "after-drain"))["host"] == "b"

    # Both drained: no host takes new VMs, said plainly.
    for name in ("a", "b"):
        await api("PATCH", f"hosts/{name}", body={"draining": True}, user="admin")
    refused = await api("POST", "vms", body={"name": "nowhere"})
    assert refused.status == 409 and refused.json["reason"] == "no_host"
    assert "a draining" in refused.json["message"]


async def test_with_a_ram_limit_a_vm_goes_only_where_it_fits(api, twarga):
    twarga.services.hosts.ram_overcommit = 1.0
    big = await create(api, "big", ram=3584)
    assert big["host"] == "b"  # only b has 3584 MB
    assert (await create(api, "small", ram=1024))["host"] == "a"  # a 3072 free > b 512
    refused = await api("POST", "vms", body={"name": "huge", "ram": 3000})  # a 2048, b 512
    assert refused.status == 409 and refused.json["reason"] == "no_host_capacity"
    assert len((await api("GET", "vms")).json) == 2  # nothing half made


async def test_a_lab_lives_on_one_host(api, twarga):
    reply = await api("POST", "labs", body={"template": "attack-defend", "name": "class"})
    assert reply.status == 201, reply.json
    lab_vms = reply.json["vms"]
    assert len(lab_vms) >= 2
    assert len({vm["host"] for vm in lab_vms}) == 1


async def test_vm_series_carry_their_host_and_hosts_have_their_own(api, twarga, jp_fetch):
    vm_b = await create(api, "label-b", ram=2048)  # b: 2048 left, a: 3072
    vm_a = await create(api, "label-a", ram=1536)  # a: 1536 left
    vm_c = await create(api, "label-c")
    assert (vm_b["host"], vm_a["host"], vm_c["host"]) == ("b", "a", "b")
    metrics = twarga.services.metrics
    await twarga.services.run(metrics.collect)
    await twarga.services.run(metrics.collect)
    reply = await jp_fetch("twarga", "metrics", headers={"Authorization": "token admin-token"})
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    hosts_of = {s.labels["vm"]: s.labels["host"] for s in families["twarga_vm_up"].samples}
    assert hosts_of == {"label-b": "b", "label-a": "a", "label-c": "b"}
    up = {s.labels["host"]: s.value for s in families["twarga_hypervisor_up"].samples}
    assert up == {"a": 1.0, "b": 1.0}
    domains = {s.labels["host"]: s.value for s in families["twarga_hypervisor_domains"].samples}
    assert domains == {"a": 1.0, "b": 2.0}
    memory = {s.labels["host"]: s.value for s in families["twarga_hypervisor_memory_bytes"].samples}
    assert memory == {"a": 3072 * 2**20, "b": 4096 * 2**20}

    # A destroyed VM's domain is placed nowhere any more.
    assert (await api("DELETE", f"vms/{vm_c['id']}")).status == 204

    async def counted() -> dict[str, float]:
        reply = await jp_fetch("twarga", "metrics", headers={"Authorization": "token admin-token"})
        families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
        found = families["twarga_hypervisor_domains"].samples
        return {s.labels["host"]: s.value for s in found} == {"a": 1.0, "b": 1.0}

    await wait_for(counted, timeout=10)


async def test_a_host_that_stops_answering_makes_its_vms_unknown_until_it_is_back(
    api, twarga, monkeypatch
):
    on_b = await create(api, "on-b", ram=2048)
    on_a = await create(api, "on-a", ram=1024)
    assert (on_b["host"], on_a["host"]) == ("b", "a")
    host_b = twarga.services.backend.hosts["b"]

    def unreachable(*_args: Any, **_kwargs: Any) -> Any:
        raise BackendUnavailable("libvirt is unreachable (list domains): test")

    # What the connection manager sees when b's libvirtd dies: the link drops, calls fail.
    monkeypatch.setattr(host_b.backend, "connected", lambda: False)
    monkeypatch.setattr(host_b.backend, "states", unreachable)
    monkeypatch.setattr(host_b.backend, "start", unreachable)
    twarga.services.backend._host_changed("b", HostState.down)
    gone = await wait_status(api, on_b["id"], "unknown")
    assert gone["status_message"] == "its host b does not answer" and gone["host"] == "b"
    assert (await api("GET", f"vms/{on_a['id']}")).json["status"] == "running"
    [down] = events(twarga, "host_down")
    assert down.details["host"] == "b" and down.details["vms"] == 1
    reconciled = [e for e in events(twarga, "reconcile") if e.vm_id == on_b["id"]]
    assert reconciled[-1].details["status"] == "unknown"
    hosts = {h["name"]: h for h in (await api("GET", "hosts", user="admin")).json}
    assert hosts["b"]["state"] == "down" and hosts["a"]["state"] == "up"

    # The other host keeps serving; new VMs go there; b's VM cannot be driven meanwhile.
    assert (await create(api, "while-b-is-down"))["host"] == "a"
    refused = await api("POST", f"vms/{on_b['id']}/action", body={"action": "start"})
    assert refused.status in (409, 503), refused.json
    # A reconciliation while b is away keeps the VM unknown (never "missing", never removed).
    await twarga.services.vms.reconcile("libvirt reconnect")
    await twarga.services.vms.remove_orphans()
    assert (await api("GET", f"vms/{on_b['id']}")).json["status"] == "unknown"

    # b answers again: the reconnect reconciles its VMs to what libvirt says.
    monkeypatch.undo()
    twarga.services.backend._host_changed("b", HostState.up)
    await twarga.services.vms.reconcile("libvirt reconnect")
    back = await wait_status(api, on_b["id"], "running")
    assert back["status_message"] is None
    [up] = events(twarga, "host_up")
    assert up.details["host"] == "b"
    last = [e for e in events(twarga, "reconcile") if e.vm_id == on_b["id"]][-1]
    assert last.details["previous"] == "unknown" and last.details["status"] == "running"
    assert "answers again" in last.message


def standalone_template(machines: int) -> dict[str, Any]:
    """A template of ``machines`` machines and no private network."""
    return {
        "schema": "twarga-lab-template/v1",
        "name": "standalone",
        "machines": [
            {"name": f"m{i}", "image": "twarga/tiny", "ram": 128} for i in range(machines)
        ],
    }


async def test_a_spread_lab_puts_each_machine_on_a_host_of_its_own(api, twarga):
    reply = await api(
        "POST", "labs", body={"template": standalone_template(2), "name": "apart", "spread": True}
    )
    assert reply.status == 201, reply.json
    assert sorted(vm["host"] for vm in reply.json["vms"]) == ["a", "b"]
    # Without spread the same template stays on one host.
    reply = await api("POST", "labs", body={"template": standalone_template(2), "name": "together"})
    assert len({vm["host"] for vm in reply.json["vms"]}) == 1


async def test_spread_is_refused_plainly_when_it_cannot_be_honoured(api, twarga):
    # Private networks live on one host: a lab with them is never spread.
    refused = await api(
        "POST", "labs", body={"template": "attack-defend", "name": "netted", "spread": True}
    )
    assert refused.status == 422 and refused.json["reason"] == "lab_on_one_host"
    # Three machines, two hosts: no lab, no VM is left behind.
    refused = await api(
        "POST", "labs", body={"template": standalone_template(3), "name": "three", "spread": True}
    )
    assert refused.status == 409 and refused.json["reason"] == "no_host"
    assert "already used by this lab" in refused.json["message"]
    assert (await api("GET", "labs")).json == []
    assert (await api("GET", "vms")).json == []
    bad = await api("POST", "labs", body={"template": "attack-defend", "name": "x", "spread": 1})
    assert bad.status == 400 and bad.json["reason"] == "bad_type"


async def test_the_notebook_client_lists_and_drains_hosts(api, twarga, jp_http_port, jp_base_url):
    url = f"http://127.0.0.1:{jp_http_port}{jp_base_url}"
    admin = Lab(url, "admin-token").admin
    frame = await asyncio.to_thread(admin.hosts)
    assert list(frame["name"]) == ["a", "b"] and list(frame["state"]) == ["up", "up"]
    drained = await asyncio.to_thread(admin.drain, "b")
    assert drained["state"] == "draining"
    assert (await create(api, "client-drained"))["host"] == "a"
    assert (await asyncio.to_thread(admin.drain, "b", False))["state"] == "up"
    with pytest.raises(PermissionDenied):
        await asyncio.to_thread(Lab(url, "alice-token").admin.hosts)
    with pytest.raises(NotFound):
        await asyncio.to_thread(admin.drain, "nowhere")


async def test_a_copy_in_progress_is_the_pending_vms_status_message(api, twarga):
    vm = await create(api, "copying")
    with twarga.services.db.session() as session:
        session.get(VM, vm["id"]).status = VMStatus.pending  # as while its image is copied
    provisioner = twarga.services.vms.provisioner
    copy = ImageCopy("twarga/tiny", "b", total_bytes=4000, copied_bytes=1000)
    await twarga.services.run(provisioner._copy_progress, vm["id"], copy)
    shown = (await api("GET", f"vms/{vm['id']}")).json
    assert shown["status_message"] == "copying image twarga/tiny to host b: 25%"
    copy.copied_bytes, copy.state, copy.seconds = 4000, "ready", 0.5
    await twarga.services.run(provisioner._copy_progress, vm["id"], copy)
    assert (await api("GET", f"vms/{vm['id']}")).json["status_message"] is None
    [copied] = events(twarga, "image_copied")
    assert copied.details["host"] == "b" and copied.details["bytes"] == 4000


class TestAHostDownAtStart:
    @pytest.fixture
    def twarga_config(self, tmp_path: Path) -> dict[str, Any]:
        # Nothing listens on that socket: the host is down from the first moment.
        gone = f"qemu+unix:///system?socket={tmp_path / 'no-libvirtd'}"
        return {"hosts": ["a=test:///default", f"b={gone}"], "min_ram_mb": 64}

    async def test_it_is_an_event_and_down_and_vms_go_elsewhere(self, api, twarga):
        async def heard() -> list[Event]:
            return events(twarga, "host_down")

        [down] = await wait_for(heard, timeout=10)
        assert down.details["host"] == "b" and down.severity == "warning"
        hosts = {h["name"]: h for h in (await api("GET", "hosts", user="admin")).json}
        assert (hosts["a"]["state"], hosts["b"]["state"]) == ("up", "down")
        assert hosts["b"]["memory_mb"] is None  # never reached: its size is not known
        assert (await create(api, "elsewhere"))["host"] == "a"


class TestADomainTypeOfItsOwn:
    @pytest.fixture
    def twarga_config(self, tmp_path: Path) -> dict[str, Any]:
        node = tmp_path / "host-b.xml"
        node.write_text(HOST_B_XML)
        return {
            "hosts": ["a=test:///default", f"b=test://{node}"],
            "host_domain_types": {"b": "kvm"},
            "min_ram_mb": 64,
        }

    async def test_a_host_named_in_host_domain_types_runs_its_guests_so(self, api, twarga):
        hosts = {h["name"]: h for h in (await api("GET", "hosts", user="admin")).json}
        # a: this machine's type (the test driver resolves to qemu); b: its own setting.
        assert (hosts["a"]["domain_type"], hosts["b"]["domain_type"]) == ("qemu", "kvm")
        placed = [await create(api, f"typed-{i}") for i in range(3)]
        assert [vm["host"] for vm in placed] == ["b", "b", "a"]  # as in the spread above
        on_b, on_a = placed[0], placed[2]
        backend = twarga.services.backend
        assert "<domain type='kvm'" in backend.domain_xml(on_b["domain"])
        assert "<domain type='qemu'" in backend.domain_xml(on_a["domain"])

    async def test_a_domain_type_for_a_host_that_is_not_listed_is_refused(self, twarga):
        twarga.host_domain_types = {"nowhere": "kvm"}
        with pytest.raises(errors.NotFound) as refused:
            twarga.make_services()
        assert "nowhere" in str(refused.value)
