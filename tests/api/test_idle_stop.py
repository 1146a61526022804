"""Idle stop: a running VM nobody uses is stopped after ``idle_stop_after`` seconds, with
an ``idle_stopped`` event; its JSON says when (``idle_stop_at``) and its credits stop
running. The clock is the credit meter's, patched here."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from tests.helpers import wait_status
from twarga_lab.db.models import VM, CreditEntry, Event
from twarga_lab.services import credits as credits_module


@pytest.fixture
def twarga_config():
    # 1 vCPU at 60 credits an hour: a credit a minute, so billing is easy to read.
    return {"idle_stop_after": 600, "credits_per_vcpu_hour": 60.0, "credits_per_gb_ram_hour": 0}


async def running_vm(api, twarga, name: str) -> tuple[dict, datetime]:
    reply = await api("POST", "vms", body={"name": name})
    assert reply.status == 201, reply.json
    vm = await wait_status(api, reply.json["id"], "running")
    with twarga.services.db.session() as session:
        started = session.get(VM, vm["id"]).started_at
    return vm, started


def idle_events(twarga, vm_id: int) -> list[Event]:
    with twarga.services.db.session() as session:
        return list(
            session.scalars(
                select(Event).where(
                    Event.vm_id == vm_id, Event.details["action"].as_string() == "idle_stopped"
                )
            )
        )


async def test_an_idle_vm_is_stopped_with_an_event_and_stops_costing(api, twarga, monkeypatch):
    clock = [datetime.now().astimezone()]
    monkeypatch.setattr(credits_module, "utcnow", lambda: clock[0])
    vm, started = await running_vm(api, twarga, "sleepy")
    clock[0] = started
    idle = twarga.services.idle
    assert idle is not None and idle.idle_stop_after == 600

    # Running and untouched: it will be stopped 600 s after its start.
    shown = (await api("GET", f"vms/{vm['id']}")).json["idle_stop_at"]
    assert datetime.fromisoformat(shown) == started + timedelta(seconds=600)
    listed = (await api("GET", "vms")).json
    assert [v["idle_stop_at"] for v in listed] == [shown]

    # Someone types on its console at 300 s (what the console socket calls on stdin).
    clock[0] = started + timedelta(seconds=300)
    assert await idle.tick() == []
    idle.note_activity(vm["id"])
    pushed = (await api("GET", f"vms/{vm['id']}")).json["idle_stop_at"]
    assert datetime.fromisoformat(pushed) == started + timedelta(seconds=900)

    # 700 s: idle for 400 s only, still running.
    clock[0] = started + timedelta(seconds=700)
    assert await idle.tick() == []
    assert (await api("GET", f"vms/{vm['id']}")).json["status"] == "running"

    # 901 s: idle for 601 s. Stopped through the normal (graceful) stop.
    clock[0] = started + timedelta(seconds=901)
    assert await idle.tick() == [vm["id"]]
    stopped = await wait_status(api, vm["id"], "stopped")
    assert stopped["idle_stop_at"] is None
    assert twarga.services.backend.state(vm["domain"]).value == "shutoff"
    [event] = idle_events(twarga, vm["id"])
    assert (event.type, event.severity, event.user_name) == ("vm", "info", "alice")
    assert "stopped after 10 min idle" in event.message, event.message
    assert event.details["idle_seconds"] == 601
    # The owner sees it in the SOC.
    seen = (await api("GET", "soc/events", params={"limit": "50"})).json
    assert [e["message"] for e in seen if e["details"].get("action") == "idle_stopped"] == [
        event.message
    ]

    # The stop billed its 901 s to the second, and nothing runs up after it.
    balance = (await api("GET", "me")).json["credits"]
    assert balance == pytest.approx(1000 - 901 / 60, abs=0.01)
    clock[0] = started + timedelta(seconds=5000)
    await twarga.services.meter.tick()
    assert await idle.tick() == []
    assert (await api("GET", "me")).json["credits"] == balance
    with twarga.services.db.session() as session:
        usage = session.scalars(select(CreditEntry).where(CreditEntry.actor == "meter")).all()
        assert [e.reason for e in usage] == ["VM usage: sleepy 901 s"]
    assert len(idle_events(twarga, vm["id"])) == 1


async def test_an_ssh_session_on_the_forward_keeps_a_vm_running(api, twarga, monkeypatch, tmp_path):
    clock = [datetime.now().astimezone()]
    monkeypatch.setattr(credits_module, "utcnow", lambda: clock[0])
    vm, started = await running_vm(api, twarga, "ssh-kept")
    idle = twarga.services.idle
    # The kernel's table as it looks while a client is connected to 127.0.0.1:ssh_port.
    table = tmp_path / "tcp"
    port = f"{vm['ssh_port']:04X}"
    table.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        f"   0: 0100007F:{port} 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0\n"
        f"   1: 0100007F:{port} 0100007F:9C40 01 00000000:00000000 00:00000000 00000000 0\n"
    )
    idle.tcp_tables = (table,)
    clock[0] = started + timedelta(seconds=650)
    assert await idle.tick() == []
    shown = (await api("GET", f"vms/{vm['id']}")).json["idle_stop_at"]
    assert datetime.fromisoformat(shown) == started + timedelta(seconds=1250)
    # The session ends (only the listener is left): 600 s later it is stopped.
    table.write_text("".join(table.read_text().splitlines(keepends=True)[:2]))
    clock[0] = started + timedelta(seconds=1250)
    assert await idle.tick() == [vm["id"]]
    await wait_status(api, vm["id"], "stopped")
    assert len(idle_events(twarga, vm["id"])) == 1


class TestOff:
    @pytest.fixture
    def twarga_config(self):
        return {}  # idle_stop_after defaults to 0: off

    async def test_nothing_is_stopped_and_no_deadline_is_shown(self, api, twarga, monkeypatch):
        clock = [datetime.now().astimezone()]
        monkeypatch.setattr(credits_module, "utcnow", lambda: clock[0])
        vm, started = await running_vm(api, twarga, "always-on")
        assert twarga.services.idle.idle_stop_after == 0
        assert (await api("GET", f"vms/{vm['id']}")).json["idle_stop_at"] is None
        clock[0] = started + timedelta(days=2)
        assert await twarga.services.idle.tick() == []
        shown = (await api("GET", f"vms/{vm['id']}")).json
        assert (shown["status"], shown["idle_stop_at"]) == ("running", None)
        assert idle_events(twarga, vm["id"]) == []


class TestCommandLine:
    @pytest.fixture
    def jp_argv(self):
        return ["--TwargaLabApp.idle_stop_after=120", "--IdleStopper.idle_cpu_percent=2.5"]

    @pytest.fixture
    def twarga_config(self):
        return {}

    def test_the_setting_reaches_the_idle_stopper(self, twarga):
        assert twarga.idle_stop_after == 120
        assert twarga.services.idle.idle_stop_after == 120
        assert twarga.services.idle.idle_cpu_percent == 2.5
        assert "--TwargaLabApp.idle_stop_after=" in type(twarga).class_get_help()
