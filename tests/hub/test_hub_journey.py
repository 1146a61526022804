"""Through a real JupyterHub and its proxy: sign-up, approval, login, tokens, the twarga
service, users' own servers, and isolation between users."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.hub.conftest import (
    ADMIN_PASSWORD,
    HubClient,
    api,
    start_server,
    stop_server,
    unique_name,
)

pytestmark = pytest.mark.hub
PASSWORD = "Correct-Horse-7-Battery"


def approved_user(hub, prefix: str) -> tuple[str, str, HubClient]:
    """Sign up, get approved by the admin, log in; returns (name, token, client)."""
    name = unique_name(prefix)
    client = HubClient(hub)
    assert client.sign_up(name, PASSWORD).status_code == 200
    admin = HubClient(hub)
    assert admin.login("admin", ADMIN_PASSWORD).status_code == 302
    assert (
        admin.form("/hub/twarga-accounts", {"action": "approve", "name": name}).status_code == 200
    )
    assert client.login(name, PASSWORD).status_code == 302
    return name, client.token(name), client


def test_sign_up_approval_login_and_a_vm_through_the_proxy(hub):
    name = unique_name("al")
    client = HubClient(hub)
    page = client.sign_up(name, PASSWORD)
    assert page.status_code == 200
    assert "waits for an admin" in page.text

    refused = HubClient(hub).login(name, PASSWORD)
    assert refused.status_code == 403
    assert "approval" in refused.text

    admin = HubClient(hub)
    assert admin.login("admin", ADMIN_PASSWORD).status_code == 302
    listing = admin.http.get("/hub/twarga-accounts")
    assert listing.status_code == 200 and name in listing.text
    # A GET never changes state: the account is still waiting.
    admin.http.get(f"/hub/twarga-accounts?action=approve&name={name}")
    assert HubClient(hub).login(name, PASSWORD).status_code == 403
    approved = admin.form("/hub/twarga-accounts", {"action": "approve", "name": name})
    assert f"{name} is approved" in approved.text

    assert client.login(name, PASSWORD).status_code == 302
    token = client.token(name)
    me = api(hub, token, "GET", "me").json()
    assert (me["name"], me["admin"], me["credits"]) == (name, False, 1000)
    created = api(hub, token, "POST", "vms", {"name": "web-1"})
    assert created.status_code == 201, created.text
    assert created.headers["Location"].endswith(f"/twarga/api/vms/{created.json()['id']}")
    listed = api(hub, token, "GET", "vms").json()
    assert [(v["name"], v["owner"]) for v in listed] == [("web-1", name)]

    actions = {e["details"].get("action") for e in hub.events(type="auth", user_name=name)}
    assert {"signup", "approved", "login"} <= actions
    assert api(hub, "not-a-token", "GET", "me").status_code == 401


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("short1", "at least 8"),
        ("password123", "too common"),
        ("xx{name}xx", "user name"),
    ],
)
def test_weak_passwords_are_refused_at_sign_up(hub, password, message):
    name = unique_name("wk")
    page = HubClient(hub).sign_up(name, password.format(name=name))
    assert page.status_code == 422
    assert message in page.text
    assert HubClient(hub).login(name, password.format(name=name)).status_code == 403


def test_admin_can_disable_and_reset_a_password(hub):
    name, _, _ = approved_user(hub, "dr")
    admin = HubClient(hub)
    admin.login("admin", ADMIN_PASSWORD)
    admin.form("/hub/twarga-accounts", {"action": "disable", "name": name})
    assert HubClient(hub).login(name, PASSWORD).status_code == 403
    admin.form("/hub/twarga-accounts", {"action": "enable", "name": name})
    page = admin.form("/hub/twarga-accounts", {"action": "reset", "name": name})
    new_password = page.text.split(f"new password for {name}: ")[1].split("<")[0].strip()
    assert HubClient(hub).login(name, PASSWORD).status_code == 403
    assert HubClient(hub).login(name, new_password).status_code == 302
    # A user is not an admin of accounts.
    user = HubClient(hub)
    user.login(name, new_password)
    assert user.form("/hub/twarga-accounts", {"action": "approve", "name": name}).status_code == 403


def test_users_are_isolated_and_only_admins_administer(hub):
    alice, alice_token, _ = approved_user(hub, "al")
    bob, bob_token, _ = approved_user(hub, "bo")
    vm = api(hub, alice_token, "POST", "vms", {"name": "private"}).json()
    for method, path, body in [
        ("GET", f"vms/{vm['id']}", None),
        ("PATCH", f"vms/{vm['id']}", {"name": "mine"}),
        ("POST", f"vms/{vm['id']}/action", {"action": "stop"}),
        ("DELETE", f"vms/{vm['id']}", None),
    ]:
        reply = api(hub, bob_token, method, path, body)
        assert reply.status_code == 404, (method, path, reply.text)
    assert api(hub, bob_token, "GET", "vms?all=1").json() == []
    for method, path, body in [
        ("GET", "admin/users", None),
        ("POST", f"admin/users/{alice}/credits", {"amount": 5, "reason": "x"}),
        ("PATCH", f"admin/users/{alice}/quota", {"max_vms": 9}),
    ]:
        assert api(hub, bob_token, method, path, body).status_code == 403

    admin = HubClient(hub)
    admin.login("admin", ADMIN_PASSWORD)
    admin_token = admin.token("admin")
    everyone = api(hub, admin_token, "GET", "vms?all=1").json()
    assert (vm["id"], alice) in {(v["id"], v["owner"]) for v in everyone}
    users = {u["name"]: u for u in api(hub, admin_token, "GET", "admin/users").json()}
    assert users[alice]["vm_count"] == 1 and users[bob]["vm_count"] == 0
    grant = api(hub, admin_token, "POST", f"admin/users/{bob}/credits",
                {"amount": 10, "reason": "welcome"})  # fmt: skip
    assert grant.json()["new_balance"] == 1010
    assert api(hub, admin_token, "DELETE", f"vms/{vm['id']}").status_code == 204


def test_a_users_account_cannot_read_the_database_or_reach_libvirt(hub):
    bob, _, _ = approved_user(hub, "bo")  # the login made bob's system account
    db = hub.db_path
    assert db.exists()
    read_db = subprocess.run(
        ["runuser", "-u", bob, "--", sys.executable, "-c", f"open({str(db)!r}, 'rb').read(1)"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert read_db.returncode != 0
    assert "Permission denied" in read_db.stderr
    virsh = subprocess.run(
        ["runuser", "-u", bob, "--", "virsh", "-c", "qemu:///system", "list", "--all"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert virsh.returncode != 0
    assert Path(db).stat().st_mode & 0o077 == 0 or Path(db).parent.stat().st_mode & 0o077 == 0


def test_a_users_own_server_reaches_the_service_with_no_arguments(hub):
    name, token, _ = approved_user(hub, "sv")
    auth = {"Authorization": f"token {token}"}
    api(hub, token, "POST", "vms", {"name": "from-hub"})
    start_server(hub, name, token)
    try:
        me = httpx.get(f"{hub.url}/user/{name}/twarga/api/me", headers=auth, timeout=60)
        assert me.status_code == 200, me.text
        assert me.json()["name"] == name
        vms = httpx.get(f"{hub.url}/user/{name}/twarga/api/vms", headers=auth, timeout=60)
        assert [v["name"] for v in vms.json()] == ["from-hub"]
        # The console websocket is forwarded too; someone else's VM is refused before it.
        from websocket import WebSocketBadStatusException, create_connection

        ws_base = hub.url.replace("http", "ws", 1)
        vm_id = vms.json()[0]["id"]
        ws = create_connection(
            f"{ws_base}/user/{name}/twarga/api/vms/{vm_id}/console",
            header=[f"Authorization: token {token}"], timeout=30,
        )  # fmt: skip
        assert json.loads(ws.recv()) == ["setup", {}]
        ws.close()
        _, other_token, _ = approved_user(hub, "ot")
        other_vm = api(hub, other_token, "POST", "vms", {"name": "theirs"}).json()
        with pytest.raises(WebSocketBadStatusException) as refused:
            create_connection(
                f"{ws_base}/user/{name}/twarga/api/vms/{other_vm['id']}/console",
                header=[f"Authorization: token {token}"], timeout=30,
            )  # fmt: skip
        assert refused.value.status_code == 404
        # No host terminal in users' servers: the VM console is their terminal.
        terminals = httpx.get(f"{hub.url}/user/{name}/api/terminals", headers=auth, timeout=30)
        assert terminals.status_code == 404
    finally:
        stop_server(hub, name, token)
