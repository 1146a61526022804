"""Through a real JupyterHub: a user's server forwards ``/twarga/api`` with its own token,
so it must forward its owner's requests only: an admin visiting the server, or another
user's server token, must not act as the owner."""

from __future__ import annotations

import httpx
import psutil
import pytest

from tests.hub.conftest import ADMIN_PASSWORD, HubClient, api, start_server, stop_server
from tests.hub.test_hub_journey import approved_user

pytestmark = pytest.mark.hub


def server_token(name: str) -> str:
    """The Hub token a user's running server holds (read from its environment, as root)."""
    for proc in psutil.process_iter(["environ"]):
        env = proc.info.get("environ") or {}
        if env.get("JUPYTERHUB_USER") == name and env.get("JUPYTERHUB_API_TOKEN"):
            return env["JUPYTERHUB_API_TOKEN"]
    raise AssertionError(f"no server process of {name}")


def get(hub, path: str, token: str) -> httpx.Response:
    return httpx.get(f"{hub.url}{path}", headers={"Authorization": f"token {token}"}, timeout=60)


def test_only_the_owner_acts_through_their_server(hub):
    owner, owner_token, _ = approved_user(hub, "ow")
    other, other_token, _ = approved_user(hub, "ot")
    assert api(hub, owner_token, "POST", "vms", {"name": "mine"}).status_code == 201
    admin = HubClient(hub)
    assert admin.login("admin", ADMIN_PASSWORD).status_code == 302
    admin_token = admin.token("admin")

    start_server(hub, owner, owner_token)
    start_server(hub, other, other_token)
    try:
        mine = get(hub, f"/user/{owner}/twarga/api/me", owner_token)
        assert mine.status_code == 200, mine.text
        assert mine.json()["name"] == owner

        # The admin may reach the owner's server (access:servers), but not act as them.
        visiting = get(hub, f"/user/{owner}/twarga/api/vms", admin_token)
        assert visiting.status_code == 403, visiting.text
        assert "owner" in visiting.json()["message"]
        posted = httpx.post(
            f"{hub.url}/user/{owner}/twarga/api/vms",
            json={"name": "by-admin"},
            headers={"Authorization": f"token {admin_token}"},
            timeout=60,
        )
        assert posted.status_code == 403, posted.text
        names = [vm["name"] for vm in api(hub, owner_token, "GET", "vms").json()]
        assert names == ["mine"]

        # Another user's server token reaches neither the owner's server nor, through
        # it, the owner's VMs; through its own server it is its own user.
        theirs = server_token(other)
        sideways = get(hub, f"/user/{owner}/twarga/api/vms", theirs)
        assert sideways.status_code in (401, 403), sideways.text
        assert "mine" not in sideways.text
        own = get(hub, f"/user/{other}/twarga/api/me", theirs)
        assert own.status_code == 200, own.text
        assert own.json()["name"] == other
        assert get(hub, f"/user/{other}/twarga/api/vms", theirs).json() == []
    finally:
        stop_server(hub, owner, owner_token)
        stop_server(hub, other, other_token)
