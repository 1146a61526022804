"""Bounded request bodies: one tenant's huge body is refused before it is decoded and
leaves nothing behind; SSH keys have a sane maximum."""

from __future__ import annotations

import json

import pytest

from tests.identity import auth


@pytest.fixture
def twarga_config():
    return {"max_body_bytes": 16 * 1024}


async def test_a_10_mb_body_is_refused_with_413_and_creates_nothing(api, jp_fetch):
    huge = json.dumps({"name": "big", "padding": "x" * (10 * 1024 * 1024)})
    reply = await jp_fetch(
        "twarga", "api", "vms",
        method="POST", body=huge, headers=auth("alice-token"), raise_error=False,
    )  # fmt: skip
    assert reply.code == 413
    error = json.loads(reply.body)
    assert error["reason"] == "body_too_large"
    assert "16384 bytes" in error["message"]
    assert (await api("GET", "vms")).json == []
    # The next, normal request is served as usual.
    assert (await api("POST", "vms", body={"name": "small"})).status == 201


async def test_an_ssh_key_has_a_maximum_length(api):
    key = "ssh-ed25519 " + "A" * 9000 + " me@laptop"
    reply = await api("PATCH", "me", body={"ssh_public_key": key})
    assert reply.status == 422, reply.json
    assert (reply.json["reason"], reply.json["field"]) == ("ssh_key_too_long", "ssh_public_key")
    assert (await api("GET", "me")).json.get("ssh_public_key") in (None, "")


async def test_an_anonymous_big_body_is_refused_as_anonymous(jp_fetch):
    reply = await jp_fetch(
        "twarga", "api", "vms", method="POST", body="x" * (64 * 1024), raise_error=False
    )
    # Anonymous callers learn nothing about limits: they are refused as anonymous (the
    # XSRF check of a cookie-less POST comes first).
    assert reply.code in (401, 403)
    assert json.loads(reply.body)["reason"] != "body_too_large"
