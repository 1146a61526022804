"""At zero credits a user's VMs stop and creating is refused."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from tests.helpers import wait_status
from twarga_lab.db.models import Event


@pytest.fixture
def twarga_config():
    return {"starting_credits": 0.5, "credits_per_vcpu_hour": 60.0, "credits_per_gb_ram_hour": 0}


async def test_at_zero_credits_the_vms_stop_with_a_warning(api, twarga, monkeypatch):
    from datetime import timedelta

    from twarga_lab.services import credits as credits_module

    reply = await api("POST", "vms", body={"name": "spender"})
    vm = await wait_status(api, reply.json["id"], "running")
    later = credits_module.utcnow() + timedelta(minutes=1)
    monkeypatch.setattr(credits_module, "utcnow", lambda: later)
    report = await twarga.services.meter.tick()
    assert report.exhausted == ["alice"]
    assert (await api("GET", "me")).json["credits"] == 0
    await wait_status(api, vm["id"], "stopped")
    with twarga.services.db.session() as session:
        warning = session.scalar(
            select(Event).where(Event.details["action"].as_string() == "credits_exhausted")
        )
    assert warning is not None and warning.severity == "warning"
    refused = await api("POST", "vms", body={"name": "another"})
    assert (refused.status, refused.json["reason"]) == (409, "no_credits")
    # Starting again is no way around it: start and restart are refused, and nothing runs.
    for action in ("start", "restart"):
        reply = await api("POST", f"vms/{vm['id']}/action", body={"action": action})
        assert (reply.status, reply.json["reason"]) == (409, "no_credits"), reply.json
    assert (await api("GET", f"vms/{vm['id']}")).json["status"] == "stopped"
    assert twarga.services.backend.state(vm["domain"]).value == "shutoff"
    with twarga.services.db.session() as session:
        refusals = session.scalars(
            select(Event).where(
                Event.vm_id == vm["id"], Event.details["reason"].as_string() == "no_credits"
            )
        ).all()
    assert len(refusals) == 2
    # With credits again it starts.
    granted = await api(
        "POST", "admin/users/alice/credits", user="admin", body={"amount": 5, "reason": "more"}
    )
    assert granted.status == 200, granted.json
    reply = await api("POST", f"vms/{vm['id']}/action", body={"action": "start"})
    assert reply.status == 200, reply.json
    await wait_status(api, vm["id"], "running")


async def test_a_stop_bills_the_seconds_since_the_last_tick(api, twarga, monkeypatch):
    from datetime import timedelta

    from twarga_lab.db.models import VM, CreditEntry
    from twarga_lab.services import credits as credits_module

    await api("GET", "me")  # alice exists from her first request
    granted = await api(
        "POST", "admin/users/alice/credits", user="admin", body={"amount": 99.5, "reason": "t"}
    )
    assert granted.json["new_balance"] == 100, granted.json
    reply = await api("POST", "vms", body={"name": "meter"})
    vm = await wait_status(api, reply.json["id"], "running")
    with twarga.services.db.session() as session:
        started = session.get(VM, vm["id"]).started_at
    # One tick at 60 s (1 vCPU at 60 credits/hour: 1 credit), then a stop at 90 s.
    monkeypatch.setattr(credits_module, "utcnow", lambda: started + timedelta(seconds=60))
    await twarga.services.meter.tick()
    assert (await api("GET", "me")).json["credits"] == 99
    monkeypatch.setattr(credits_module, "utcnow", lambda: started + timedelta(seconds=90))
    reply = await api("POST", f"vms/{vm['id']}/action", body={"action": "stop"})
    assert reply.status == 200
    await wait_status(api, vm["id"], "stopped")
    assert (await api("GET", "me")).json["credits"] == 98.5  # 90 s billed, not 60
    with twarga.services.db.session() as session:
        usage = session.scalars(
            select(CreditEntry).where(CreditEntry.actor == "meter").order_by(CreditEntry.id)
        ).all()
        assert [(e.amount_milli, e.reason) for e in usage] == [
            (-1000, "VM usage: meter 60 s"),
            (-500, "VM usage: meter 30 s"),
        ]
    # A second tick bills nothing more for the stopped VM; nor does destroying it.
    monkeypatch.setattr(credits_module, "utcnow", lambda: started + timedelta(seconds=600))
    await twarga.services.meter.tick()
    assert (await api("DELETE", f"vms/{vm['id']}")).status == 204
    assert (await api("GET", "me")).json["credits"] == 98.5


async def test_destroying_a_running_vm_bills_its_last_seconds(api, twarga, monkeypatch):
    from datetime import timedelta

    from twarga_lab.db.models import VM
    from twarga_lab.services import credits as credits_module

    await api("GET", "me")
    grant = {"amount": 9.5, "reason": "t"}
    await api("POST", "admin/users/alice/credits", user="admin", body=grant)
    reply = await api("POST", "vms", body={"name": "short"})
    vm = await wait_status(api, reply.json["id"], "running")
    with twarga.services.db.session() as session:
        started = session.get(VM, vm["id"]).started_at
    monkeypatch.setattr(credits_module, "utcnow", lambda: started + timedelta(seconds=42))
    assert (await api("DELETE", f"vms/{vm['id']}")).status == 204
    assert (await api("GET", "me")).json["credits"] == 9.3  # 42 s at 1 credit a minute
