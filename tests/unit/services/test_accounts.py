"""The account service on a real SQLite database: names that must never become accounts,
bcrypt's 72-byte limit, the sign-up rate limit, and a lockout that counts per account
and per source with the ban check and the count in one step."""

from __future__ import annotations

import grp
import pwd
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from twarga_lab.db import Database
from twarga_lab.db.models import Event
from twarga_lab.errors import Conflict, ValidationFailed
from twarga_lab.services.accounts import (
    ACCOUNT_SCOPE,
    AccountService,
    TooManyRequests,
    account_refusal,
    check_password,
    hash_password,
)
from twarga_lab.services.bans import BanPolicy

PASSWORD = "Correct-Horse-7-Battery"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'accounts.db'}").open()
    yield database
    database.dispose()


@pytest.fixture
def accounts(db: Database) -> AccountService:
    return AccountService(
        db, approval_required=False, ban_policy=BanPolicy(maxretry=5), reserved_names={"boss"}
    )


@pytest.mark.parametrize("name", ["libvirt-qemu", "postgres", "root", "daemon"])
def test_names_of_this_hosts_system_accounts_cannot_be_signed_up_for(accounts, name):
    pwd.getpwnam(name)  # they exist on this host
    with pytest.raises(ValidationFailed) as refused:
        accounts.sign_up(name, PASSWORD, "127.0.0.1")
    assert refused.value.details["field"] == "username"
    assert name in refused.value.message
    assert accounts.list() == []


@pytest.mark.parametrize("name", ["admin", "administrator", "twarga", "twarga-x", "boss", "kvm"])
def test_reserved_names_and_the_configured_admins_cannot_be_signed_up_for(accounts, name):
    with pytest.raises(ValidationFailed) as refused:
        accounts.sign_up(name, PASSWORD, "127.0.0.1")
    assert "reserved" in refused.value.message or "system" in refused.value.message
    assert accounts.list() == []


def test_a_group_name_is_refused_too(accounts):
    # ssl-cert is a group on this host with no user of that name, and is not reserved.
    grp.getgrnam("ssl-cert")
    with pytest.raises(ValidationFailed) as refused:
        accounts.sign_up("ssl-cert", PASSWORD, "127.0.0.1")
    assert refused.value.reason == "system_username"


def test_passwords_over_72_bytes_are_refused_at_sign_up_with_a_clear_message(accounts):
    with pytest.raises(ValidationFailed) as refused:
        accounts.sign_up("longpw", "é" * 37, "127.0.0.1")  # 37 characters, 74 bytes
    assert refused.value.reason == "password_too_long"
    assert "72 bytes" in refused.value.message
    accounts.sign_up("longpw", "é" * 36, "127.0.0.1")  # exactly 72 bytes is fine
    assert accounts.login("longpw", "é" * 36, "127.0.0.1").ok


def test_a_long_password_at_login_is_a_refusal_not_an_error(accounts):
    accounts.sign_up("carol", PASSWORD, "127.0.0.1")
    result = accounts.login("carol", "x" * 500, "127.0.0.1")
    assert (result.ok, result.reason) == (False, "bad_credentials")
    # Hashes bcrypt 4 made of longer passwords (it read the first 72 bytes) still match.
    old = hash_password("y" * 72)
    assert check_password("y" * 100, old)


def test_sign_ups_are_limited_per_source_before_any_hash(db):
    accounts = AccountService(db, approval_required=False, signup_limit=3)
    for i in range(3):
        accounts.sign_up(f"user{i}x", PASSWORD, "192.0.2.1")
    with pytest.raises(TooManyRequests) as refused:
        accounts.sign_up("user9x", PASSWORD, "192.0.2.1")
    assert refused.value.status_code == 429
    assert "too many sign-ups" in refused.value.message
    with db.session() as session:
        alarms = session.scalars(select(Event).where(Event.type == "security")).all()
        assert [(e.source, e.details["action"]) for e in alarms] == [
            ("192.0.2.1", "signup_refused")
        ]
    accounts.sign_up("user9x", PASSWORD, "192.0.2.2")  # another address is not affected
    with pytest.raises(Conflict):
        accounts.sign_up("user9x", PASSWORD, "192.0.2.3")


def test_failures_from_rotating_sources_still_lock_the_account(accounts):
    accounts.sign_up("dave", PASSWORD, "127.0.0.1")
    for i in range(5):
        assert accounts.login("dave", "wrong-password", f"198.51.100.{i}").reason == (
            "bad_credentials"
        )
    locked = accounts.login("dave", PASSWORD, "198.51.100.200")
    assert (locked.ok, locked.reason) == (False, "banned")
    assert accounts.is_locked("dave")
    # Five typos behind a shared address lock out only the account typed wrong.
    accounts.sign_up("erin", PASSWORD, "127.0.0.1")
    assert accounts.login("erin", PASSWORD, "198.51.100.4").ok
    assert not accounts.is_banned("198.51.100.4")


def test_a_source_spraying_many_accounts_is_banned(db):
    accounts = AccountService(
        db, approval_required=False, source_policy=BanPolicy(maxretry=6), signup_limit=100
    )
    for i in range(6):
        accounts.login(f"nobody{i}", "wrong-password", "203.0.113.9")
    assert accounts.is_banned("203.0.113.9")
    accounts.sign_up("frank", PASSWORD, "127.0.0.1")
    assert accounts.login("frank", PASSWORD, "203.0.113.9").reason == "banned"
    assert accounts.login("frank", PASSWORD, "203.0.113.10").ok


def test_parallel_wrong_logins_never_check_more_than_maxretry_passwords(accounts, db):
    accounts.sign_up("gina", PASSWORD, "127.0.0.1")
    checked = []
    real_check = check_password

    import twarga_lab.services.accounts as module

    def counting_check(password: str, hashed: str) -> bool:
        checked.append(password)
        return real_check(password, hashed)

    module.check_password = counting_check
    try:
        start = threading.Barrier(20)
        results = []

        def attempt(i: int) -> None:
            start.wait()
            results.append(accounts.login("gina", f"wrong-{i}", f"198.51.100.{i}"))

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        module.check_password = real_check
    assert len(checked) == 5
    assert sorted(r.reason for r in results) == ["bad_credentials"] * 5 + ["banned"] * 15
    # And the right password cannot slip in while the account is locked.
    assert accounts.login("gina", PASSWORD, "198.51.100.99").reason == "banned"


def test_a_right_password_takes_its_attempt_back(accounts):
    accounts.sign_up("hank", PASSWORD, "127.0.0.1")
    for _ in range(4):
        accounts.login("hank", "wrong-password", "127.0.0.1")
    for _ in range(3):
        assert accounts.login("hank", PASSWORD, "127.0.0.1").ok
    assert not accounts.is_locked("hank")
    assert ACCOUNT_SCOPE == "hub-account"


def test_a_disabled_account_is_refused_and_can_change_its_password_only_with_the_old(accounts, db):
    accounts.sign_up("ivy", PASSWORD, "127.0.0.1")
    assert account_refusal(db, "ivy") is None
    with pytest.raises(ValidationFailed) as wrong:
        accounts.change_password("ivy", "not-it", "Another-Good-Pass-9", "127.0.0.1")
    assert wrong.value.details["field"] == "current_password"
    accounts.change_password("ivy", PASSWORD, "Another-Good-Pass-9", "127.0.0.1")
    assert accounts.login("ivy", "Another-Good-Pass-9", "127.0.0.1").ok
    assert not accounts.login("ivy", PASSWORD, "127.0.0.1").ok
    accounts.disable("admin", "ivy")
    assert account_refusal(db, "ivy") == "this account is disabled"
    assert account_refusal(db, "nobody-here") is None


class _Context:
    def __init__(self, peer: str, believed: str) -> None:
        self._orig_remote_ip = peer  # the TCP peer
        self.remote_ip = believed  # what tornado's xheaders made of the headers
        self.protocol = "http"


class _Connection:
    def __init__(self, context: _Context) -> None:
        self.context = context


def request_from(peer: str, **headers: str):
    from tornado.httputil import HTTPHeaders, HTTPServerRequest

    h = HTTPHeaders()
    for key, value in headers.items():
        h.add(key.replace("_", "-"), value)
    believed = headers.get("X_Real_Ip", peer)
    return HTTPServerRequest("POST", "/hub/login", headers=h, connection=_Connection(
        _Context(peer, believed)))  # fmt: skip


@pytest.mark.parametrize(
    ("peer", "headers", "client"),
    [
        # A client straight to the Hub: its forwarded headers are its own words.
        ("192.0.2.7", {"X_Forwarded_For": "10.0.0.1", "X_Real_Ip": "10.0.0.2"}, "192.0.2.7"),
        # Through the local proxy, which appended the address it saw.
        ("127.0.0.1", {"X_Forwarded_For": "198.51.100.4"}, "198.51.100.4"),
        # The client's own X-Forwarded-For and X-Real-Ip are ignored: the proxy's hop counts.
        (
            "127.0.0.1",
            {"X_Forwarded_For": "10.0.0.1, 10.0.0.2, 198.51.100.4", "X_Real_Ip": "10.0.0.3"},
            "198.51.100.4",
        ),
        # IPv4 seen through an IPv6 socket is the same address.
        ("127.0.0.1", {"X_Forwarded_For": "::ffff:198.51.100.4"}, "198.51.100.4"),
        # Garbage in the proxy's hop: the proxy's own address, never the garbage.
        ("127.0.0.1", {"X_Forwarded_For": "not-an-ip"}, "127.0.0.1"),
        # No header at all: the proxy itself (local).
        ("127.0.0.1", {}, "127.0.0.1"),
    ],
)
def test_the_client_address_believes_only_the_trusted_proxys_hop(peer, headers, client):
    from twarga_lab.hub.authenticator import client_address

    assert client_address(request_from(peer, **headers), ["127.0.0.1"]) == client


def test_a_chain_of_trusted_proxies_is_walked_from_the_right():
    from twarga_lab.hub.authenticator import client_address

    request = request_from("127.0.0.1", X_Forwarded_For="10.0.0.9, 203.0.113.5, 10.1.2.3")
    assert client_address(request, ["127.0.0.1", "10.1.0.0/16"]) == "203.0.113.5"
    assert client_address(request, ["127.0.0.1"]) == "10.1.2.3"


def test_parallel_sign_ups_cannot_overrun_the_limit(db):
    accounts = AccountService(db, approval_required=False, signup_limit=3)
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def attempt(i: int) -> None:
        start.wait()
        try:
            accounts.sign_up(f"para{i}x", PASSWORD, "192.0.2.50")
            outcomes.append("created")
        except TooManyRequests:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["created"] * 3 + ["refused"] * 5
    assert len(accounts.list()) == 3
