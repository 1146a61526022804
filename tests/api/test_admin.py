"""The admin API: users with credits and quotas, grants with a reason, quota edits."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from twarga_lab.db.models import Event
from twarga_lab.handlers import ROUTES


def admin_calls():
    calls = []
    for pattern, handler in ROUTES:
        if "/admin/" not in pattern:
            continue
        path = re.sub(r"\(\?P<\w+>[^)]*\)", "alice", pattern).removeprefix("/twarga/api/")
        for method in ("get", "post", "patch"):
            if method in handler.__dict__:
                calls.append((method.upper(), path))
    return calls


@pytest.mark.parametrize(("method", "path"), admin_calls())
async def test_non_admins_get_403_on_every_admin_route(api, method, path):
    body = {"amount": 5, "reason": "x"} if method == "POST" else {} if method == "PATCH" else None
    reply = await api(method, path, user="bob", body=body)
    assert (reply.status, reply.json["reason"]) == (403, "admin_required")


async def test_admin_lists_users_with_credits_vms_and_quota(api):
    await api("POST", "vms", body={"name": "one"})
    await api("GET", "me", user="bob")
    users = {u["name"]: u for u in (await api("GET", "admin/users", user="admin")).json}
    assert users["alice"]["credits"] == 1000
    assert users["alice"]["vm_count"] == 1
    assert users["alice"]["quota"]["max_vms"] == 5
    assert users["alice"]["active"] is True
    assert users["bob"]["vm_count"] == 0


async def test_grants_and_takes_credits_with_a_reason(api, twarga):
    await api("GET", "me")
    reply = await api("POST", "admin/users/alice/credits", user="admin",
                      body={"amount": 250, "reason": "course project"})  # fmt: skip
    assert (reply.status, reply.json["new_balance"]) == (200, 1250)
    reply = await api("POST", "admin/users/alice/credits", user="admin",
                      body={"amount": -50.5, "reason": "refund mistake"})  # fmt: skip
    assert reply.json["new_balance"] == 1199.5
    assert (await api("GET", "me")).json["credits"] == 1199.5
    ledger = (await api("GET", "admin/users/alice/credits", user="admin")).json
    assert [(r["amount"], r["reason"], r["actor"]) for r in ledger[:2]] == [
        (-50.5, "refund mistake", "admin"),
        (250, "course project", "admin"),
    ]
    with twarga.services.db.session() as session:
        events = session.scalars(
            select(Event).where(Event.details["action"].as_string() == "credits")
        ).all()
    assert len(events) == 2


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"amount": 5}, 400, "missing_field"),
        ({"reason": "x"}, 400, "missing_field"),
        ({"amount": "5", "reason": "x"}, 400, "bad_type"),
        ({"amount": 0, "reason": "x"}, 422, "invalid_amount"),
        ({"amount": 5, "reason": "  "}, 422, "missing_reason"),
        ({"amount": -5000, "reason": "too much"}, 422, "insufficient_credits"),
    ],
)
async def test_bad_grants_change_nothing(api, body, status, reason):
    await api("GET", "me")
    reply = await api("POST", "admin/users/alice/credits", user="admin", body=body)
    assert (reply.status, reply.json["reason"]) == (status, reason)
    assert (await api("GET", "me")).json["credits"] == 1000


async def test_unknown_user_is_404(api):
    reply = await api("POST", "admin/users/nobody/credits", user="admin",
                      body={"amount": 5, "reason": "x"})  # fmt: skip
    assert reply.status == 404


async def test_quota_edit_applies_to_the_next_create(api):
    await api("GET", "me")
    reply = await api("PATCH", "admin/users/alice/quota", user="admin", body={"max_vms": 1})
    assert (reply.status, reply.json["quota"]["max_vms"]) == (200, 1)
    assert (await api("POST", "vms", body={"name": "a"})).status == 201
    refused = await api("POST", "vms", body={"name": "b"})
    assert (refused.status, refused.json["reason"]) == (409, "quota_exceeded")
    await api("PATCH", "admin/users/alice/quota", user="admin", body={"max_vms": None})
    assert (await api("GET", "me")).json["quota"]["max_vms"] == 5
    assert (await api("POST", "vms", body={"name": "b"})).status == 201
    bad = await api("PATCH", "admin/users/alice/quota", user="admin", body={"max_vms": -1})
    assert (bad.status, bad.json["field"]) == (422, "max_vms")
    bad = await api("PATCH", "admin/users/alice/quota", user="admin", body={"vms": 3})
    assert bad.status == 400
