"""The console websocket and the HTTP API under an authorizer whose ``is_authorized`` is a
coroutine (jupyter_server allows that): a refusal must refuse, not pass as a truthy
coroutine object."""

from __future__ import annotations

import json

import pytest
from jupyter_server.auth.authorizer import Authorizer
from sqlalchemy import select
from tornado.httpclient import HTTPClientError

from tests.api.test_routes import route_calls
from tests.helpers import wait_status
from tests.identity import auth
from twarga_lab.db.models import Event

ASKED: list[tuple[str, str, str]] = []
REFUSING = {"on": False}  # the test's VM is created first, then the authorizer says no


class AsyncRefusingAuthorizer(Authorizer):
    """Says no to everything (once ``REFUSING["on"]``), asynchronously."""

    async def is_authorized(self, handler, user, action, resource) -> bool:  # type: ignore[override]
        if not REFUSING["on"]:
            return True
        ASKED.append((user.username, action, resource))
        return False


class AsyncAllowingAuthorizer(Authorizer):
    """Says yes to everything, asynchronously."""

    async def is_authorized(self, handler, user, action, resource) -> bool:  # type: ignore[override]
        ASKED.append((user.username, action, resource))
        return True


@pytest.fixture
def authorizer_class():
    return AsyncRefusingAuthorizer


@pytest.fixture
def jp_server_config(jp_server_config, authorizer_class):
    jp_server_config["ServerApp"]["authorizer_class"] = authorizer_class
    ASKED.clear()
    REFUSING["on"] = False
    return jp_server_config


def console_events(twarga) -> list[str]:
    with twarga.services.db.session() as session:
        return list(
            session.scalars(
                select(Event.details["action"].as_string()).where(
                    Event.details["action"].as_string().like("console_%")
                )
            ).all()
        )


async def running_vm(api) -> dict:
    created = await api("POST", "vms", body={"name": "guarded"})
    assert created.status == 201, created.json
    vm = await wait_status(api, created.json["id"], "running")
    REFUSING["on"] = True
    return vm


def console(vm) -> tuple[str, ...]:
    return ("twarga", "api", "vms", str(vm["id"]), "console")


async def test_an_async_refusal_refuses_the_console(api, twarga, jp_ws_fetch):
    vm = await running_vm(api)
    with pytest.raises(HTTPClientError) as refused:
        await jp_ws_fetch(*console(vm), headers=auth("alice-token"))
    assert refused.value.code == 403
    assert json.loads(refused.value.response.body)["message"] == "not allowed to open consoles"
    assert ("alice", "execute", "twarga") in ASKED
    assert twarga.settings["twarga_lab_consoles"].sessions == {}
    assert console_events(twarga) == []


HTTP_CALLS = [(m, p) for m, p in route_calls() if not p.endswith("/console")]


@pytest.mark.parametrize(("method", "path"), HTTP_CALLS)
async def test_http_handlers_await_an_async_authorizer(api, twarga, method, path):
    """Every HTTP route of the route table refuses (jupyter_server's ``@authorized``
    awaits the coroutine) with a JSON 403, and the authorizer was asked."""
    vm = await running_vm(api)
    body = {} if method in ("POST", "PATCH") else None
    # Admin-only routes refuse others before asking the authorizer.
    user = "admin" if path.startswith(("admin/", "hosts")) else "alice"
    reply = await api(method, path.replace("/1", f"/{vm['id']}", 1), body=body, user=user)
    assert reply.status == 403, reply.json
    assert set(reply.json) >= {"message", "reason"}
    assert ASKED and ASKED[-1][0] == user
    assert (await api("GET", f"vms/{vm['id']}", user="admin")).status == 403
    REFUSING["on"] = False
    assert (await api("GET", f"vms/{vm['id']}")).json["status"] == "running"


@pytest.mark.parametrize("authorizer_class", [AsyncAllowingAuthorizer])
async def test_an_async_yes_opens_the_socket(api, twarga, jp_ws_fetch):
    """The same request with an authorizer that allows: the socket opens (the test driver
    has no serial consoles, so the session tells why it ends and disconnects)."""
    vm = await running_vm(api)
    ws = await jp_ws_fetch(*console(vm), headers=auth("alice-token"))
    assert json.loads(await ws.read_message()) == ["setup", {}]
    kind, text = json.loads(await ws.read_message())
    assert kind == "stdout" and "could not be opened" in text
    assert json.loads(await ws.read_message()) == ["disconnect", 1]
    assert await ws.read_message() is None
    assert ("alice", "execute", "twarga") in ASKED
    assert (await api("GET", "metrics/host")).status == 200
    # Nothing was attached, so nothing was opened.
    assert "console_open" not in console_events(twarga)
