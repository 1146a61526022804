"""The Hub login lockout, attacked for real through the proxy: five failures against one
account lock it from every address, forged X-Real-Ip / X-Forwarded-For values neither
spread the failures nor pin them on someone else, other people behind the same address
still log in, parallel attempts cannot squeeze in more than five password checks, and
the lock survives a Hub restart."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.hub.conftest import ADMIN_PASSWORD, HubClient, unique_name

pytestmark = pytest.mark.hub
ATTACKER = "127.0.0.66"
PASSWORD = "Correct-Horse-7-Battery"


def approved(hub, prefix: str) -> str:
    name = unique_name(prefix)
    assert HubClient(hub).sign_up(name, PASSWORD).status_code == 200
    admin = HubClient(hub)
    assert admin.login("admin", ADMIN_PASSWORD).status_code == 302
    admin.form("/hub/twarga-accounts", {"action": "approve", "name": name})
    return name


def wrong_login(hub, name: str, source: str, i: int) -> tuple[int, str]:
    # What an attacker rotates to look like many clients (or like someone else); sent on
    # the form's GET too, since the Hub ties an anonymous form's xsrf token to the address.
    forged = {"X-Real-Ip": f"10.9.{i}.1", "X-Forwarded-For": f"10.8.{i}.1, 10.7.{i}.1"}
    client = HubClient(hub, source)
    client.http.get("/hub/login", headers=forged)
    reply = client.http.post(
        "/hub/login",
        data={"username": name, "password": f"wrong-{i}", "_xsrf": client.xsrf()},
        headers=forged,
    )
    assert "Login form invalid" not in reply.text
    return reply.status_code, reply.text


def test_rotating_forwarded_headers_still_lock_the_account_and_survive_a_restart(hub):
    victim = approved(hub, "vi")
    for i in range(5):
        assert wrong_login(hub, victim, ATTACKER, i)[0] == 403
    # Locked from every address, even with the right password.
    for source in (ATTACKER, "127.0.0.1"):
        sixth = HubClient(hub, source).login(victim, PASSWORD)
        assert sixth.status_code == 403
        assert "too many failed logins" in sixth.text

    failed = [
        e for e in hub.events(user_name=victim) if e["details"].get("action") == "login_failed"
    ]
    assert len(failed) == 5
    # The forged headers were ignored: every failure is the real address's.
    assert {e["source"] for e in failed} == {ATTACKER}
    critical = hub.events(severity="critical", user_name=victim)
    assert len(critical) == 1
    assert victim in critical[0]["message"]
    assert critical[0]["details"]["scope"] == "hub-account"

    # Someone else behind the same address logs in.
    assert HubClient(hub, ATTACKER).login("admin", ADMIN_PASSWORD).status_code == 302

    hub.stop()
    hub.start()
    again = HubClient(hub, "127.0.0.1").login(victim, PASSWORD)
    assert again.status_code == 403
    assert "too many failed logins" in again.text
    assert HubClient(hub, ATTACKER).login("admin", ADMIN_PASSWORD).status_code == 302


def test_parallel_wrong_logins_never_get_more_than_five_password_checks(hub):
    victim = approved(hub, "pa")
    with ThreadPoolExecutor(16) as pool:
        replies = list(
            pool.map(lambda i: wrong_login(hub, victim, f"127.0.1.{i + 1}", i), range(16))
        )
    assert all(status == 403 for status, _ in replies)
    locked = [text for _, text in replies if "too many failed logins" in text]
    checked = [
        e for e in hub.events(user_name=victim) if e["details"].get("action") == "login_failed"
    ]
    assert len(checked) == 5
    assert len(locked) == 11
    assert HubClient(hub).login(victim, PASSWORD).status_code == 403
