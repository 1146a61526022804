"""The Hub's admin flag, read from a small Hub API on 127.0.0.1: the service's token is
sent, answers are cached for ``ttl``, and an unreachable Hub leaves the last answer."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import tornado.httpserver
import tornado.web

from twarga_lab.services.hubusers import HubUserDirectory

TOKEN = "service-token-123"


class FakeHub:
    """What the Hub API answers for ``GET /hub/api/users/{name}``."""

    def __init__(self) -> None:
        self.admins: dict[str, bool] = {"alice": True, "bob": False}
        self.requests: list[tuple[str, str | None]] = []
        self.broken = False


class UserHandler(tornado.web.RequestHandler):
    def initialize(self, hub: FakeHub) -> None:
        self.hub = hub

    def get(self, name: str) -> None:
        self.hub.requests.append((name, self.request.headers.get("Authorization")))
        if self.request.headers.get("Authorization") != f"token {TOKEN}":
            raise tornado.web.HTTPError(403)
        if self.hub.broken:
            raise tornado.web.HTTPError(503)
        if name not in self.hub.admins:
            raise tornado.web.HTTPError(404)
        self.write({"name": name, "admin": self.hub.admins[name]})


@contextlib.asynccontextmanager
async def running_hub() -> AsyncIterator[tuple[FakeHub, str]]:
    """A Hub API on an ephemeral port of 127.0.0.1, on the test's event loop."""
    fake = FakeHub()
    app = tornado.web.Application([(r"/hub/api/users/([^/]+)", UserHandler, {"hub": fake})])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets([sock])
    port = sock.getsockname()[1]
    try:
        yield fake, f"http://127.0.0.1:{port}/hub/api/"
    finally:
        server.stop()
        await server.close_all_connections()


def directory(url: str, **kw: Any) -> HubUserDirectory:
    return HubUserDirectory(url, TOKEN, **kw)


async def test_the_admin_flag_comes_from_the_hub_with_the_token():
    async with running_hub() as (fake, url):
        users = directory(url)
        try:
            assert await users.is_admin("alice") is True
            assert await users.is_admin("bob") is False
            assert fake.requests == [("alice", f"token {TOKEN}"), ("bob", f"token {TOKEN}")]
        finally:
            await users.close()


async def test_answers_are_cached_for_ttl():
    async with running_hub() as (fake, url):
        users = directory(url, ttl=3600)
        try:
            assert await users.is_admin("alice") is True
            fake.admins["alice"] = False
            assert await users.is_admin("alice") is True
            assert len(fake.requests) == 1
        finally:
            await users.close()
        fresh = directory(url, ttl=0)
        try:
            assert await fresh.is_admin("alice") is False
            fake.admins["alice"] = True
            assert await fresh.is_admin("alice") is True
        finally:
            await fresh.close()


async def test_a_hub_error_keeps_the_last_answer_and_an_unknown_user_is_no_admin():
    async with running_hub() as (fake, url):
        users = directory(url, ttl=0)
        try:
            assert await users.is_admin("alice") is True
            fake.broken = True
            assert await users.is_admin("alice") is True  # last known answer
            assert await users.is_admin("bob") is False  # never seen
            fake.broken = False
            assert await users.is_admin("nobody") is False  # 404
        finally:
            await users.close()


async def test_a_wrong_token_is_not_admin():
    async with running_hub() as (fake, url):
        users = HubUserDirectory(url, "wrong")
        try:
            assert await users.is_admin("alice") is False
            assert fake.requests == [("alice", "token wrong")]
        finally:
            await users.close()


async def test_names_are_quoted_into_one_path_segment():
    async with running_hub() as (fake, url):
        fake.admins["a/b c"] = True
        users = directory(url)
        try:
            assert await users.is_admin("a/b c") is True
            assert fake.requests[-1][0] == "a/b c"  # one segment, else the Hub says 404
        finally:
            await users.close()


async def test_an_unreachable_hub_is_no_admin():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    users = HubUserDirectory(f"http://127.0.0.1:{port}/hub/api", TOKEN)
    try:
        assert await users.is_admin("alice") is False
    finally:
        await users.close()
