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
