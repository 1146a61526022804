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


def test_tokens_sent_in_urls_never_reach_the_log(hub):
    """A token a script puts in a URL (``?token=``) is scrubbed from the Hub's and the
    service's request logs (the Jupyter family's token-leak CVE class)."""
    admin = HubClient(hub)
    assert admin.login("admin", ADMIN_PASSWORD).status_code == 302
    token = admin.token("admin")
    base = f"{hub.url}/services/twarga/twarga/api"
    for path in ("me", "vms", "no-such-route"):
        httpx.get(f"{base}/{path}?token={token}", timeout=30)
    # The service's console refuses a token in the URL outright: browsers log URLs.
    console = httpx.get(
        f"{base}/vms/1/console?token={token}",
        headers={"Connection": "Upgrade", "Upgrade": "websocket"},
        timeout=30,
    )
    assert console.status_code in (400, 401, 403, 404)
    # The Hub's log holds both processes' request lines; flushed by the next request.
    api(hub, token, "GET", "me")

    def logged() -> bool:
        return "GET /services/twarga/twarga/api/no-such-route" in hub.log.read_text(
            errors="replace"
        )

    deadline = time.monotonic() + 20
    while not logged():
        assert time.monotonic() < deadline, hub.tail()
        time.sleep(0.2)
    assert token not in hub.log.read_text(errors="replace")
