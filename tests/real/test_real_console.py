"""A terminado websocket on a real guest's serial console (a libvirt console stream)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time

import psutil
import pytest
from sqlalchemy import select
from tornado.httpclient import HTTPClientError

from tests.helpers import wait_for, wait_status
from tests.identity import auth
from twarga_lab.db.models import Event

pytestmark = pytest.mark.real


@pytest.fixture
def twarga_config(real_settings) -> dict:
    return real_settings(23300, console_idle_timeout=6.0)


@pytest.fixture
def booted_vm(api, twarga, jp_asyncio_loop):
    """A running guest whose shell is up (its banner is in the console log)."""

    async def boot():
        reply = await api("POST", "vms", body={"name": "shell"})
        vm = await wait_status(api, reply.json["id"], "running", timeout=90)
        log = twarga.services.vms.instance_dir(vm["domain"]) / "console.log"

        async def banner():
            return log.exists() and "Twarga Lab VM shell is up" in log.read_text(errors="replace")

        await wait_for(banner, timeout=90, interval=0.2)
        return vm

    vm = jp_asyncio_loop.run_until_complete(boot())
    yield vm
    jp_asyncio_loop.run_until_complete(api("DELETE", f"vms/{vm['id']}"))


async def read_until(ws, pattern: str, timeout: float = 30.0) -> str:
    """Collect stdout until ``pattern`` matches; fail at the deadline."""
    seen = ""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {pattern!r} in {seen[-500:]!r}"
        message = await asyncio.wait_for(ws.read_message(), remaining)
        assert message is not None, f"socket closed; got {seen[-500:]!r}"
        kind, *payload = json.loads(message)
        if kind == "stdout":
            seen += payload[0]
    return seen


async def closed(ws, timeout: float) -> list:
    """Messages until the server closes the socket (fails at the deadline)."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        message = await asyncio.wait_for(ws.read_message(), deadline - time.monotonic())
        if message is None:
            return got
        got.append(json.loads(message))


def console_url(vm):
    return ("twarga", "api", "vms", str(vm["id"]), "console")


def console_actions(twarga, vm) -> list[str]:
    with twarga.services.db.session() as session:
        return list(
            session.scalars(
                select(Event.details["action"].as_string())
                .where(Event.vm_id == vm["id"])
                .order_by(Event.id)
            ).all()
        )


def closed_for(reason: str, twarga, vm):
    """A probe: is there a console_close event with ``reason``?"""

    async def probe() -> bool:
        with twarga.services.db.session() as session:
            reasons = session.scalars(
                select(Event.details["reason"].as_string()).where(
                    Event.vm_id == vm["id"], Event.details["action"].as_string() == "console_close"
                )
            ).all()
        return reason in reasons

    return probe


def virsh_children() -> list[str]:
    """``virsh`` processes this test's server started (the console must run none)."""
    me = psutil.Process(os.getpid())
    return [p.cmdline()[0] for p in me.children(recursive=True) if p.name() == "virsh"]


async def test_echo_round_trip_and_events(jp_ws_fetch, booted_vm, twarga):
    ws = await jp_ws_fetch(*console_url(booted_vm), headers=auth("alice-token"))
    assert json.loads(await ws.read_message()) == ["setup", {}]
    # The banner says the console is attached: keys typed from now on reach the guest.
    seen = await read_until(ws, "Escape character")
    ws.write_message(json.dumps(["set_size", 24, 80]))
    ws.write_message(json.dumps(["stdin", "\r"]))
    ws.write_message(json.dumps(["stdin", "echo $((6*7))\r"]))
    seen += await read_until(ws, r"(^|\n)42\r?\n")
    # The screen is the guest's: no line from a client program such as virsh's polkit
    # warning ("Authorization not available. Check if polkit service is running").
    assert "polkit" not in seen
    assert "Authorization not available" not in seen
    assert virsh_children() == []
    # ^] leaves the session, as the banner says.
    ws.write_message(json.dumps(["stdin", "\x1d"]))
    assert ["disconnect", 1] in await closed(ws, timeout=10)
    await wait_for(closed_for("left with the escape character", twarga, booted_vm), timeout=5)

    async def both_events():
        actions = console_actions(twarga, booted_vm)
        return "console_open" in actions and "console_close" in actions

    await wait_for(both_events, timeout=5)


async def test_refused_sockets_leave_the_open_session_alone(
    jp_ws_fetch, jp_fetch, booted_vm, twarga
):
    """A cross-origin websocket or a plain GET on a console someone uses is refused before
    anything happens: the session keeps working and no second "console opened" event."""
    ws = await jp_ws_fetch(*console_url(booted_vm), headers=auth("alice-token"))
    await read_until(ws, "Escape character")

    async def opened():
        return "console_open" in console_actions(twarga, booted_vm)

    await wait_for(opened, timeout=5)

    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
    ):
        with pytest.raises(HTTPClientError) as foreign:
            await jp_ws_fetch(*console_url(booted_vm), headers={**auth("alice-token"), **headers})
        assert foreign.value.code == 403
        assert json.loads(foreign.value.response.body)["message"]
    plain = await jp_fetch(*console_url(booted_vm), headers=auth("alice-token"), raise_error=False)
    assert plain.code == 400
    assert "websocket" in json.loads(plain.body)["message"]

    ws.write_message(json.dumps(["stdin", "echo still-$((40+2))\r"]))
    await read_until(ws, r"(^|\n)still-42\r?\n")
    assert console_actions(twarga, booted_vm).count("console_open") == 1
    assert "console_close" not in console_actions(twarga, booted_vm)
    ws.close()


async def test_others_are_refused_before_the_socket_opens(jp_ws_fetch, booted_vm):
    with pytest.raises(HTTPClientError) as refused:
        await jp_ws_fetch(*console_url(booted_vm), headers=auth("bob-token"))
    assert refused.value.code == 404
    with pytest.raises(HTTPClientError) as anonymous:
        await jp_ws_fetch(*console_url(booted_vm), headers={"Authorization": ""})
    assert anonymous.value.code == 401
    with pytest.raises(HTTPClientError) as foreign:
        evil = {**auth("alice-token"), "Origin": "http://evil.example"}
        await jp_ws_fetch(*console_url(booted_vm), headers=evil)
    assert foreign.value.code == 403
    with pytest.raises(HTTPClientError) as in_url:
        await jp_ws_fetch(*console_url(booted_vm), headers=auth("alice-token"),
                          params={"token": "alice-token"})  # fmt: skip
    assert in_url.value.code == 400


async def test_new_session_takes_over_and_idle_sessions_close(jp_ws_fetch, booted_vm, twarga):
    first = await jp_ws_fetch(*console_url(booted_vm), headers=auth("alice-token"))
    await read_until(first, "Escape character")
    second = await jp_ws_fetch(*console_url(booted_vm), headers=auth("admin-token"))
    assert ["disconnect", 1] in await closed(first, timeout=10)
    await read_until(second, "Escape character")

    await wait_for(closed_for("taken over by a new session", twarga, booted_vm), timeout=5)
    second.write_message(json.dumps(["stdin", "echo still-here\r"]))
    await read_until(second, r"(^|\n)still-here\r?\n")
    # No input for console_idle_timeout (6 s): the server closes the session.
    started = time.monotonic()
    assert ["disconnect", 1] in await closed(second, timeout=20)
    assert time.monotonic() - started >= 5
    await wait_for(closed_for("idle", twarga, booted_vm), timeout=5)


async def test_stopping_the_vm_closes_the_session(jp_ws_fetch, api, booted_vm, twarga):
    ws = await jp_ws_fetch(*console_url(booted_vm), headers=auth("alice-token"))
    await read_until(ws, "Escape character")
    await api("POST", f"vms/{booted_vm['id']}/action", body={"action": "force-stop"})
    assert ["disconnect", 1] in await closed(ws, timeout=15)
    await wait_for(closed_for("the VM stopped", twarga, booted_vm), timeout=5)


async def test_flow_control_loses_no_output(jp_ws_fetch, booted_vm, monkeypatch):
    """With tiny buffers reading the guest pauses and resumes all the time; the output
    still arrives whole and in order, and the console keeps answering."""
    from twarga_lab.services.consoles import ConsoleSession
    from twarga_lab.virt.console_stream import ConsoleStream

    monkeypatch.setattr(ConsoleSession, "high_water", 64)
    monkeypatch.setattr(ConsoleSession, "low_water", 16)
    pauses = []
    original = ConsoleStream.set_reading

    def counting(self, reading):
        pauses.append(reading)
        original(self, reading)

    monkeypatch.setattr(ConsoleStream, "set_reading", counting)
    ws = await jp_ws_fetch(*console_url(booted_vm), headers=auth("alice-token"))
    await read_until(ws, "Escape character")
    ws.write_message(json.dumps(["stdin", "seq 1 3000; echo seq-$((1+1))-done\r"]))
    seen = await read_until(ws, r"(^|\n)seq-2-done\r?\n", timeout=120)
    lines = [line.strip() for line in seen.replace("\r", "").split("\n")]
    numbers = [int(line) for line in lines if line.isdigit()]
    assert numbers == list(range(1, 3001))
    assert False in pauses and True in pauses
    ws.write_message(json.dumps(["stdin", "echo $((6*7))\r"]))
    await read_until(ws, r"(^|\n)42\r?\n")
    ws.close()
