"""The Hub login lockout: five failures from one address ban it, the ban survives a Hub
restart, and a critical event is written."""

from __future__ import annotations

import pytest

from tests.hub.conftest import ADMIN_PASSWORD, HubClient

pytestmark = pytest.mark.hub
ATTACKER = "127.0.0.66"


def test_sixth_attempt_is_refused_even_with_the_right_password_and_after_a_restart(hub):
    for _ in range(5):
        assert HubClient(hub, ATTACKER).login("admin", "wrong-password").status_code == 403
    sixth = HubClient(hub, ATTACKER).login("admin", ADMIN_PASSWORD)
    assert sixth.status_code == 403
    assert "too many failed logins" in sixth.text

    critical = hub.events(severity="critical")
    assert len(critical) == 1
    assert ATTACKER in critical[0]["message"]
    assert critical[0]["details"]["scope"] == "hub"
    assert (
        len([e for e in hub.events(type="auth") if e["details"].get("action") == "login_failed"])
        == 5
    )

    # Another address is not affected.
    assert HubClient(hub, "127.0.0.1").login("admin", ADMIN_PASSWORD).status_code == 302

    hub.stop()
    hub.start()
    again = HubClient(hub, ATTACKER).login("admin", ADMIN_PASSWORD)
    assert again.status_code == 403
    assert "too many failed logins" in again.text
    assert HubClient(hub, "127.0.0.1").login("admin", ADMIN_PASSWORD).status_code == 302
