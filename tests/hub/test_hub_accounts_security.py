"""Attacks on the Hub's accounts, performed for real through a real JupyterHub and its
configurable-http-proxy: claiming system accounts at sign-up, tokens and sessions that
outlive a disabled account or a logout, sign-up floods, over-long passwords, cross-site
POSTs and off-site ``next`` redirects."""

from __future__ import annotations

import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest

from tests.hub.conftest import ADMIN_PASSWORD, HubClient, api, unique_name, wait_until

pytestmark = pytest.mark.hub
PASSWORD = "Correct-Horse-7-Battery"
UID_MIN, UID_MAX = 70000, 79999  # TwargaAuthenticator.system_uid_min / _max defaults


@pytest.fixture(scope="module")
def system_users() -> Iterator[list[str]]:
    """Names of system accounts the tests (or the Hub for them) created: removed after."""
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


def admin_client(hub) -> HubClient:
    admin = HubClient(hub)
    assert admin.login("admin", ADMIN_PASSWORD).status_code == 302
    return admin


def approved_user(hub, system_users: list[str], prefix: str) -> tuple[str, HubClient]:
    """Sign up, get approved, log in (which creates the system account)."""
    name = unique_name(prefix)
    system_users.append(name)
    client = HubClient(hub)
    assert client.sign_up(name, PASSWORD).status_code == 200
    approved = admin_client(hub).form("/hub/twarga-accounts", {"action": "approve", "name": name})
    assert f"{name} is approved" in approved.text
    assert client.login(name, PASSWORD).status_code == 302
    return name, client


def start_server(hub, name: str, token: str) -> None:
    started = httpx.post(
        f"{hub.url}/hub/api/users/{name}/server",
        headers={"Authorization": f"token {token}"},
        timeout=90,
    )
    assert started.status_code in (201, 202), started.text

    def ready() -> bool:
        model = httpx.get(
            f"{hub.url}/hub/api/user", headers={"Authorization": f"token {token}"}
        ).json()
        return bool(model["servers"].get("", {}).get("ready"))

    wait_until(ready, 120, f"{name}'s server starting")


def browser_session(client: HubClient, name: str) -> httpx.Response:
    """Open the user's JupyterLab in the browser (the Hub's OAuth dance sets the server's
    cookie) and read the twarga service's /me through it, as the lab panel does."""
    lab = client.http.get(f"/user/{name}/lab", follow_redirects=True)
    assert lab.status_code == 200, lab.text[:300]
    return client.http.get(f"/user/{name}/twarga/api/me")


def replay(hub, cookies: httpx.Cookies, path: str) -> httpx.Response:
    """A request carrying a copy of old cookies, as an attacker who kept them would send."""
    with httpx.Client(base_url=hub.url, cookies=cookies, timeout=30) as thief:
        return thief.get(path)


# -- 1. sign-up cannot claim system accounts ------------------------------------------------


@pytest.mark.parametrize("name", ["libvirt-qemu", "postgres"])
def test_sign_up_as_an_existing_system_account_is_refused(hub, name):
    pwd.getpwnam(name)  # the account exists on this host
    page = HubClient(hub).sign_up(name, PASSWORD)
    assert page.status_code == 422
    assert f"the user name {name} belongs to an account of this computer" in page.text
    assert not [e for e in hub.events(type="auth", user_name=name)]


def test_an_admin_cannot_hand_a_system_account_to_a_hub_user_through_the_api(hub):
    admin = admin_client(hub)
    headers = {"Authorization": f"token {admin.token('admin')}"}
    created = httpx.post(f"{hub.url}/hub/api/users/postgres", headers=headers, timeout=30)
    assert created.status_code == 400, created.text
    assert httpx.get(f"{hub.url}/hub/api/users/postgres", headers=headers).status_code == 404


def test_reserved_names_are_refused_at_sign_up(hub):
    for name in ("root", "admin", "twarga"):
        page = HubClient(hub).sign_up(name, PASSWORD)
        assert page.status_code == 422, name
        assert "reserved" in page.text or "belongs to an account" in page.text


def test_a_new_users_system_account_gets_a_uid_from_twargas_range(hub, system_users):
    name, _ = approved_user(hub, system_users, "sy")
    entry = pwd.getpwnam(name)
    assert UID_MIN <= entry.pw_uid <= UID_MAX
    assert entry.pw_gecos == "Twarga Lab user"
    assert Path(entry.pw_dir).stat().st_mode & 0o777 == 0o700
    created = hub.events(user_name=name)
    assert any(e["details"].get("action") == "system_account_created" for e in created)
    # A second login reuses the account Twarga created.
    assert HubClient(hub).login(name, PASSWORD).status_code == 302
    assert pwd.getpwnam(name).pw_uid == entry.pw_uid


def test_a_system_account_twarga_did_not_create_is_never_handed_to_a_hub_user(hub, system_users):
    name = unique_name("fo")
    system_users.append(name)
    assert HubClient(hub).sign_up(name, PASSWORD).status_code == 200
    admin_client(hub).form("/hub/twarga-accounts", {"action": "approve", "name": name})
    # Before the first login, someone else makes a system account of that name.
    subprocess.run(["useradd", "--no-create-home", name], check=True)
    refused = HubClient(hub).login(name, PASSWORD)
    assert refused.status_code == 403
    assert "was not created by Twarga Lab" in refused.text
    assert pwd.getpwnam(name).pw_gecos != "Twarga Lab user"


# -- 3. disabling, resetting and changing passwords revoke access ---------------------------


def test_disabling_an_account_revokes_its_tokens_sessions_and_processes(hub, system_users, request):
    name, client = approved_user(hub, system_users, "ds")
    token = client.token(name)
    hub_api = f"{hub.url}/hub/api/user"
    assert httpx.get(hub_api, headers={"Authorization": f"token {token}"}).status_code == 200
    assert api(hub, token, "GET", "me").status_code == 200
    start_server(hub, name, token)
    assert browser_session(client, name).json()["name"] == name
    cookies = httpx.Cookies(client.http.cookies)
    # Something their code left running on the host, outside the server.
    leftover = subprocess.Popen(["runuser", "-u", name, "--", "sleep", "600"])
    request.addfinalizer(leftover.kill)

    admin = admin_client(hub)
    page = admin.form("/hub/twarga-accounts", {"action": "disable", "name": name})
    assert f"{name} is disabled" in page.text

    # The old token: refused by the Hub's API and by the twarga service at once.
    assert httpx.get(hub_api, headers={"Authorization": f"token {token}"}).status_code == 403
    refused = api(hub, token, "GET", "me")
    assert refused.status_code in (401, 403), refused.text
    # The old browser cookies: no longer logged in to the Hub, nor to their server.
    assert replay(hub, cookies, "/hub/api/user").status_code == 403
    assert replay(hub, cookies, f"/user/{name}/twarga/api/me").status_code != 200
    # The server is stopped and no process of theirs is left from it.
    admin_token = admin.token("admin")
    model = httpx.get(
        f"{hub.url}/hub/api/users/{name}", headers={"Authorization": f"token {admin_token}"}
    ).json()
    assert model["servers"] == {}
    wait_until(
        lambda: subprocess.run(["pgrep", "-u", name]).returncode == 1,
        30,
        f"every process of {name} ending",
    )
    assert leftover.wait(timeout=10) != 0


def test_resetting_a_password_revokes_the_old_tokens(hub, system_users):
    name, client = approved_user(hub, system_users, "rs")
    token = client.token(name)
    assert api(hub, token, "GET", "me").status_code == 200
    admin_client(hub).form("/hub/twarga-accounts", {"action": "reset", "name": name})
    hub_api = f"{hub.url}/hub/api/user"
    assert httpx.get(hub_api, headers={"Authorization": f"token {token}"}).status_code == 403
    # The service believes a token the Hub accepted for a few seconds at most.
    wait_until(
        lambda: api(hub, token, "GET", "me").status_code == 401,
        15,
        "the twarga service refusing the revoked token",
    )


def test_users_change_their_own_password_with_the_current_one(hub, system_users):
    name, client = approved_user(hub, system_users, "pw")
    assert client.http.get("/hub/twarga-password").status_code == 200
    new = "Second-Good-Pass-4"
    wrong = client.form(
        "/hub/twarga-password",
        {"current_password": "not-my-password", "password": new, "password_confirm": new},
    )
    assert wrong.status_code == 422
    assert "the current password is wrong" in wrong.text
    # Without the Hub's xsrf token (a cross-site form), nothing changes.
    forged = client.http.post(
        "/hub/twarga-password",
        data={"current_password": PASSWORD, "password": new, "password_confirm": new},
        headers={"Origin": "http://evil.example"},
    )
    assert forged.status_code == 403
    assert HubClient(hub).login(name, PASSWORD).status_code == 302
    token = client.token(name)
    done = client.form(
        "/hub/twarga-password",
        {"current_password": PASSWORD, "password": new, "password_confirm": new},
    )
    assert done.status_code == 200
    assert "Your password is changed" in done.text
    assert HubClient(hub).login(name, PASSWORD).status_code == 403
    assert HubClient(hub).login(name, new).status_code == 302
    # This browser stays logged in; the tokens made before the change do not work.
    assert client.http.get("/hub/api/user").status_code == 200
    hub_api = f"{hub.url}/hub/api/user"
    assert httpx.get(hub_api, headers={"Authorization": f"token {token}"}).status_code == 403


# -- 4. sign-up floods and long passwords ---------------------------------------------------


def test_sign_ups_are_rate_limited_per_source(hub):
    source = "127.0.0.77"
    for _ in range(20):  # TwargaAuthenticator.signup_limit
        assert HubClient(hub, source).sign_up(unique_name("fl"), PASSWORD).status_code == 200
    refused = HubClient(hub, source).sign_up(unique_name("fl"), PASSWORD)
    assert refused.status_code == 429
    assert "too many sign-ups from your address" in refused.text
    assert HubClient(hub, "127.0.0.78").sign_up(unique_name("fl"), PASSWORD).status_code == 200


def test_passwords_over_72_bytes_are_refused_at_sign_up_and_are_no_500_at_login(hub):
    name = unique_name("lp")
    page = HubClient(hub).sign_up(name, "Long-" + "x" * 95)
    assert page.status_code == 422
    assert "at most 72 bytes" in page.text
    login = HubClient(hub).login("admin", "y" * 100)
    assert login.status_code == 403
    assert "Invalid username or password" in login.text
    assert HubClient(hub).login("admin", ADMIN_PASSWORD).status_code == 302


# -- 5. cross-site POSTs, logout, off-site redirects ----------------------------------------


def test_admin_actions_need_the_hubs_xsrf_token(hub):
    name = unique_name("xs")
    assert HubClient(hub).sign_up(name, PASSWORD).status_code == 200
    admin = admin_client(hub)
    # What a page on evil.example makes the admin's browser send: the cookies, no token.
    forged = admin.http.post(
        "/hub/twarga-accounts",
        data={"action": "approve", "name": name},
        headers={"Origin": "http://evil.example", "Referer": "http://evil.example/"},
    )
    assert forged.status_code == 403
    assert HubClient(hub).login(name, PASSWORD).status_code == 403  # still waiting
    # A GET does nothing either; the real form does.
    admin.http.get("/hub/twarga-accounts", params={"action": "approve", "name": name})
    assert "waiting for approval" in admin.http.get("/hub/twarga-accounts").text
    assert (
        f"{name} is approved"
        in admin.form("/hub/twarga-accounts", {"action": "approve", "name": name}).text
    )


def test_logout_ends_the_session_for_old_cookies_too(hub, system_users):
    name, client = approved_user(hub, system_users, "lo")
    start_server(hub, name, client.token(name))
    assert browser_session(client, name).json()["name"] == name
    cookies = httpx.Cookies(client.http.cookies)
    assert replay(hub, cookies, f"/user/{name}/twarga/api/me").status_code == 200
    client.http.get("/hub/logout")
    assert replay(hub, cookies, "/hub/api/user").status_code == 403
    # The server keeps running; the old cookie no longer reaches it nor, through it, the
    # twarga service (a server believes the Hub's answer for a few seconds at most).
    wait_until(
        lambda: replay(hub, cookies, f"/user/{name}/twarga/api/me").status_code in (401, 403),
        15,
        "the user's server refusing the logged-out cookie",
    )


@pytest.mark.parametrize(
    "next_url",
    ["//evil.example/", "https://evil.example", "///evil.example/x", "/\\evil.example/"],
)
def test_next_never_redirects_off_site(hub, next_url):
    def stays_on_the_hub(response: httpx.Response) -> None:
        location = response.headers.get("Location", "")
        parts = urlsplit(location)
        assert not location.startswith(("//", "/\\")), location
        assert parts.netloc in ("", urlsplit(hub.url).netloc), location
        assert "evil.example" not in parts.netloc

    client = HubClient(hub)
    client.http.get("/hub/login")
    login = client.http.post(
        f"/hub/login?next={quote(next_url)}",
        data={"username": "admin", "password": ADMIN_PASSWORD, "_xsrf": client.xsrf()},
    )
    assert login.status_code == 302
    stays_on_the_hub(login)
    # Already logged in, the login page redirects at once: still on the Hub.
    again = client.http.get(f"/hub/login?next={quote(next_url)}")
    assert again.status_code == 302
    stays_on_the_hub(again)
    # The sign-up page never redirects anywhere.
    visitor = HubClient(hub)
    page = visitor.http.get(f"/hub/signup?next={quote(next_url)}")
    assert page.status_code == 200
    signed = visitor.form(f"/hub/signup?next={quote(next_url)}", {"username": unique_name("nx"),
        "password": PASSWORD, "password_confirm": PASSWORD})  # fmt: skip
    assert signed.status_code == 200
    stays_on_the_hub(signed)
