"""``/twarga/api/hosts``: the hypervisor hosts, their capacity and state, and draining
(admins only)."""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from tornado import web

from twarga_lab.handlers.admin import AdminHandler
from twarga_lab.schemas import UpdateHost


class HostListHandler(AdminHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        hosts = self.services.hosts
        assert hosts is not None
        self.write_json(await self.services.run(hosts.list))


class HostHandler(AdminHandler):
    @web.authenticated
    @authorized
    async def get(self, name: str) -> None:
        hosts = self.services.hosts
        assert hosts is not None
        self.write_json(await self.services.run(hosts.get, name))

    @web.authenticated
    @authorized
    async def patch(self, name: str) -> None:
        request = UpdateHost.from_body(self.json_body())
        hosts = self.services.hosts
        assert hosts is not None
        self.write_json(
            await self.services.run(hosts.set_draining, self.identity, name, request.draining)
        )


default_handlers = [
    (r"/twarga/api/hosts", HostListHandler),
    (r"/twarga/api/hosts/(?P<name>[^/]+)", HostHandler),
]
