"""Walk the one route table: every route refuses anonymous callers and bad tokens."""

from __future__ import annotations

import re

import pytest
from tornado.web import RequestHandler

from twarga_lab.handlers import ROUTES

METHODS = ("get", "post", "put", "patch", "delete")


def route_calls() -> list[tuple[str, str]]:
    calls = []
    for pattern, handler in ROUTES:
        path = re.sub(r"\(\?P<\w+>[^)]*\)", "1", pattern).lstrip("/")
        for method in METHODS:
            if getattr(handler, method) is not getattr(RequestHandler, method):
                # API paths relative to /twarga/api, others (/twarga/metrics) absolute.
                api_path = path.removeprefix("twarga/api/")
                calls.append((method.upper(), api_path if api_path != path else f"/{path}"))
    return calls


def test_the_route_table_covers_the_contract():
    paths = {path for _, path in route_calls()}
    assert {"me", "vms", "vms/1", "vms/1/action", "images"} <= paths


@pytest.mark.parametrize(("method", "path"), route_calls())
async def test_every_route_refuses_anonymous_callers(api, method, path):
    body = {} if method in ("POST", "PATCH") else None
    reply = await api(method, path, user=None, body=body)
    # Writes without a token fail the XSRF check (403) before authentication (401).
    assert reply.status == (401 if method == "GET" else 403), reply.json
    assert set(reply.json) >= {"message", "reason"}


@pytest.mark.parametrize(("method", "path"), route_calls())
async def test_every_route_refuses_a_wrong_token(api, method, path):
    body = {} if method in ("POST", "PATCH") else None
    reply = await api(method, path, user="mallory", body=body)
    assert reply.status == (401 if method == "GET" else 403), reply.json
