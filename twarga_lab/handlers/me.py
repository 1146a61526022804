"""``/twarga/api/me``: who I am, my credits, quota and usage."""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from tornado import web

from twarga_lab.handlers.base import TwargaAPIHandler
from twarga_lab.schemas import SetSSHKey


class MeHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.write_json(await self.services.run(self.services.users.me, self.identity))

    @web.authenticated
    @authorized
    async def patch(self) -> None:
        request = SetSSHKey.from_body(self.json_body())
        users = self.services.users
        self.write_json(await self.services.run(users.set_ssh_key, self.identity, request))


default_handlers = [(r"/twarga/api/me", MeHandler)]
