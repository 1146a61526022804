"""Proxy mode (a Hub user's own server forwarding ``/twarga/api`` to the twarga service
with the server's token) in front of a real Twarga service and a real guest.

The service is a separate ``jupyter server`` on qemu:///system (``running_server``); the
user's server is the in-process one, in proxy mode, as alice's server: its token is
alice's and ``$JUPYTERHUB_USER`` is alice. Identities are the fake Hub's
(``tests/identity.py``), plus a Hub *service* that happens to be called alice.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from jupyter_server.auth.authorizer import AllowAllAuthorizer
from jupyter_server.auth.identity import User
from tornado.httpclient import HTTPClientError
from traitlets.config import Config

from tests.api.test_console_security import ASKED, REFUSING, AsyncRefusingAuthorizer
from tests.helpers import wait_for
from tests.identity import FakeHubIdentityProvider, auth
from tests.real.conftest import running_server
from tests.real.test_real_console import closed, read_until

pytestmark = pytest.mark.real

OWNER = "alice"
SERVER_TOKEN = "alice-token"  # what the Hub gives alice's server as $JUPYTERHUB_API_TOKEN


class HubIdentityWithServices(FakeHubIdentityProvider):
    """The fake Hub's users, and a Hub service named like the server's owner."""

    def get_user(self, handler):
        if handler.request.headers.get("Authorization") == "token service-token":
            handler._token_authenticated = True
            user = User(username=OWNER, name=OWNER)
            user.hub_user = {"name": OWNER, "kind": "service"}  # type: ignore[attr-defined]
            return user
        return super().get_user(handler)


@pytest.fixture(scope="module")
def service():
    with running_server(23800) as server:
        yield server


@pytest.fixture(scope="module")
def guest(service):
    """alice's guest on the service, booted (``ready``), as a user waits for it with
    ``vm.wait("ready")`` before opening its console: a slow boot under load is not taken
    for a dead console."""
    headers = auth(SERVER_TOKEN)
    created = httpx.post(
        f"{service.url}twarga/api/vms", json={"name": "behind"}, headers=headers, timeout=60
    )
    assert created.status_code == 201, created.text
    vm = created.json()
    deadline = time.monotonic() + 180
    while not (vm["status"] == "running" and vm["ready"]):
        assert vm["status"] in ("pending", "running"), vm
        assert time.monotonic() < deadline, f"{vm} did not boot"
        time.sleep(0.3)
        vm = httpx.get(f"{service.url}twarga/api/vms/{vm['id']}", headers=headers).json()
    return vm


# busybox ash's prompt ("root@behind:~# "), and the cursor-position query (ESC [6n) its line
# editor may send right after it, in the same write.
SHELL_PROMPT = r"[#$] (\x1b\[[0-9;]*[A-Za-z])*$"


async def shell_prompt(ws, console_log: Path, timeout: float = 120.0) -> None:
    """Press Enter until the guest's shell answers with a prompt (it may still boot); a
    failure shows what the guest wrote to its serial port meanwhile (``console_log``)."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        ws.write_message(json.dumps(["stdin", "\r"]))
        try:
            await read_until(ws, SHELL_PROMPT, timeout=2.0)
            return
        except (AssertionError, TimeoutError) as nothing_yet:
            last = str(nothing_yet) or last
            if time.monotonic() > deadline:
                written = console_log.read_text(errors="replace") if console_log.exists() else ""
                pytest.fail(f"no shell prompt on the console: {last}; the guest wrote "
                            f"{written[-1500:]!r}")  # fmt: skip


@pytest.fixture
def authorizer_class():
    return AllowAllAuthorizer


@pytest.fixture
def jp_server_config(service, monkeypatch, authorizer_class):
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", SERVER_TOKEN)
    monkeypatch.setenv("JUPYTERHUB_USER", OWNER)
    return Config(
        {
            "ServerApp": {
                "jpserver_extensions": {"twarga_lab": True},
                "identity_provider_class": HubIdentityWithServices,
                "authorizer_class": authorizer_class,
            },
            "TwargaLabApp": {"mode": "proxy", "service_url": service.url},
        }
    )


def service_vms(service) -> list[str]:
    reply = httpx.get(f"{service.url}twarga/api/vms", headers=auth(SERVER_TOKEN))
    return [vm["name"] for vm in reply.json()]


def console_events(service, vm) -> list[dict]:
    reply = httpx.get(
        f"{service.url}twarga/api/soc/events",
        params={"vm_id": str(vm["id"]), "limit": "1000"},
        headers=auth(SERVER_TOKEN),
    )
    assert reply.status_code == 200, reply.text
    events = sorted(reply.json(), key=lambda e: e["id"])  # the API lists newest first
    return [e for e in events if e["details"].get("action", "").startswith("console_")]


def console(vm) -> tuple[str, ...]:
    return ("twarga", "api", "vms", str(vm["id"]), "console")


async def test_only_the_owners_requests_are_forwarded(jp_fetch, service):
    async def call(token, method="GET", path="me", body=None):
        reply = await jp_fetch(
            "twarga", "api", path, method=method, headers=auth(token), raise_error=False,
            body=None if body is None else json.dumps(body),
        )  # fmt: skip
        return reply.code, json.loads(reply.body) if reply.body else None

    code, me = await call("alice-token")
    assert (code, me["name"]) == (200, OWNER)
    before = service_vms(service)
    # Someone else the Hub lets reach alice's server (bob with access:servers, an admin
    # visiting it, bob's own server token, a service) does not act as alice.
    for token in ("bob-token", "admin-token", "service-token"):
        code, body = await call(token)
        assert code == 403, (token, body)
        assert set(body) >= {"message", "reason"} and "owner" in body["message"]
        code, body = await call(token, "POST", "vms", {"name": f"not-{token[:3]}"})
        assert code == 403, (token, body)
    assert service_vms(service) == before
    code, _ = await call("not-a-token")
    assert code in (401, 403)


async def test_the_console_is_checked_before_it_is_forwarded(jp_ws_fetch, jp_fetch, service, guest):
    earlier = len(console_events(service, guest))

    def actions() -> list[str]:
        return [e["details"]["action"] for e in console_events(service, guest)[earlier:]]

    ws = await jp_ws_fetch(*console(guest), headers=auth("alice-token"))
    assert json.loads(await ws.read_message()) == ["setup", {}]
    await read_until(ws, "Escape character")
    await shell_prompt(ws, service.work / "vms" / "instances" / guest["domain"] / "console.log")
    ws.write_message(json.dumps(["stdin", "echo $((6*7))\r"]))
    seen = await read_until(ws, r"(^|\n)42\r?\n")
    assert "polkit" not in seen and "Authorization not available" not in seen

    async def opened_once():
        return actions() == ["console_open"]

    await wait_for(opened_once, timeout=10)

    refusals = [
        (auth("bob-token"), 403),
        (auth("admin-token"), 403),
        (auth("service-token"), 403),
        ({**auth("alice-token"), "Origin": "http://evil.example"}, 403),
        ({**auth("alice-token"), "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
         403),
    ]  # fmt: skip
    for headers, status in refusals:
        with pytest.raises(HTTPClientError) as refused:
            await jp_ws_fetch(*console(guest), headers=headers)
        assert refused.value.code == status, headers
        assert json.loads(refused.value.response.body)["message"]
    plain = await jp_fetch(*console(guest), headers=auth("alice-token"), raise_error=False)
    assert plain.code == 400
    assert "websocket" in json.loads(plain.body)["message"]
    old_version = await jp_fetch(
        *console(guest),
        headers={**auth("alice-token"), "Upgrade": "websocket", "Connection": "Upgrade",
                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "8"},
        raise_error=False,
    )  # fmt: skip
    assert old_version.code == 426

    # None of them reached the service: the session still answers, opened once, not closed.
    ws.write_message(json.dumps(["stdin", "echo still-$((40+2))\r"]))
    await read_until(ws, r"(^|\n)still-42\r?\n")
    assert actions() == ["console_open"]

    # Closing the browser's socket closes the service's.
    ws.close()

    async def closed_upstream():
        return actions() == ["console_open", "console_close"]

    await wait_for(closed_upstream, timeout=10)


async def test_the_service_closing_closes_the_browsers_socket(jp_ws_fetch, service, guest):
    ws = await jp_ws_fetch(*console(guest), headers=auth("alice-token"))
    await read_until(ws, "Escape character")
    ws.write_message(json.dumps(["stdin", "\x1d"]))  # ^] ends the session at the service
    assert ["disconnect", 1] in await closed(ws, timeout=10)


@pytest.mark.parametrize("authorizer_class", [AsyncRefusingAuthorizer])
async def test_an_async_refusal_stops_the_forwarding(jp_fetch, jp_ws_fetch, service, guest):
    """The user's server's own authorizer is awaited before anything goes upstream."""
    earlier = len(console_events(service, guest))
    before = service_vms(service)
    ASKED.clear()
    REFUSING["on"] = True
    try:
        reply = await jp_fetch(
            "twarga", "api", "vms", method="POST", body=json.dumps({"name": "refused"}),
            headers=auth("alice-token"), raise_error=False,
        )  # fmt: skip
        assert reply.code == 403
        with pytest.raises(HTTPClientError) as refused:
            await jp_ws_fetch(*console(guest), headers=auth("alice-token"))
        assert refused.value.code == 403
    finally:
        REFUSING["on"] = False
    assert ("alice", "execute", "twarga") in ASKED
    assert service_vms(service) == before
    assert console_events(service, guest)[earlier:] == []
