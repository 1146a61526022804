"""The twarga service under the Hub is reachable by every tenant: a huge body is refused
before it is read into memory, and the service keeps serving everyone else."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.hub.conftest import ADMIN_PASSWORD, HubClient, api

pytestmark = pytest.mark.hub


def test_a_10_mb_body_to_the_service_is_refused_and_the_service_keeps_serving(hub):
    admin = HubClient(hub)
    assert admin.login("admin", ADMIN_PASSWORD).status_code == 302
    token = admin.token("admin")
    huge = b'{"name": "big", "padding": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    service = f"http://127.0.0.1:{hub.env['TWARGA_SERVICE_PORT']}/services/twarga/twarga/api/vms"
    started = time.monotonic()
    try:
        reply = httpx.post(
            service,
            content=huge,
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
            timeout=30,
        )
        status: int | None = reply.status_code
    except httpx.HTTPError:
        status = None  # the server closed the connection on the oversized Content-Length
    assert status in (None, 400, 413)
    assert time.monotonic() - started < 10
    # A body between the API's limit and the HTTP limit gets the API's JSON answer.
    middle = api(hub, token, "POST", "vms", {"name": "mid", "padding": "x" * (200 * 1024)})
    assert middle.status_code == 413, middle.text
    assert middle.json()["reason"] == "body_too_large"
    listed = api(hub, token, "GET", "vms")
    assert listed.status_code == 200
    assert "big" not in [vm["name"] for vm in listed.json()]
